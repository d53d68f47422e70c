"""LR schedule as a pure function of the step; parameter groups for weight decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lresnet.train.config import OptimConfig, ScheduleConfig
from lresnet.train.schedule import build_optimizer, build_schedule, param_groups, scaled_lr


def test_reference_multistep_divides_by_ten_at_epochs_12_15_18():
    sched = build_schedule(ScheduleConfig(), OptimConfig(lr=0.1), steps_per_epoch=100, global_batch=512)
    assert sched.total_steps == 2000
    assert sched(0) == pytest.approx(0.1)
    assert sched(1199) == pytest.approx(0.1)
    assert sched(1200) == pytest.approx(0.01)
    assert sched(1500) == pytest.approx(0.001)
    assert sched(1800) == pytest.approx(0.0001)
    assert sched(1999) == pytest.approx(0.0001)


def test_warmup_ramps_linearly_to_base():
    sched = build_schedule(ScheduleConfig(warmup_epochs=1), OptimConfig(lr=0.1), 10, 512)
    lrs = [sched(s) for s in range(12)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[0] == pytest.approx(0.1 / 11)
    assert lrs[10] == pytest.approx(0.1)


def test_poly_and_cosine_end_at_min_lr():
    for kind in ("poly", "cosine"):
        sched = build_schedule(ScheduleConfig(kind=kind, epochs=2, min_lr=0.001), OptimConfig(lr=0.1), 50, 512)
        assert sched(0) == pytest.approx(0.1)
        assert sched(100) == pytest.approx(0.001)
        assert 0.001 < sched(50) < 0.1
    cos = build_schedule(ScheduleConfig(kind="cosine", epochs=2), OptimConfig(lr=0.1), 50, 512)
    assert cos(50) == pytest.approx(0.05)
    poly = build_schedule(ScheduleConfig(kind="poly", epochs=2, power=2.0), OptimConfig(lr=0.1), 50, 512)
    assert poly(50) == pytest.approx(0.1 * 0.25)


def test_schedule_is_pure():
    sched = build_schedule(ScheduleConfig(kind="cosine"), OptimConfig(), 7, 512)
    assert [sched(s) for s in (5, 3, 5)] == [sched(5), sched(3), sched(5)]


def test_max_steps_overrides_epochs():
    sched = build_schedule(ScheduleConfig(max_steps=123), OptimConfig(), 10, 512)
    assert sched.total_steps == 123


def test_linear_scaling_with_global_batch():
    assert scaled_lr(OptimConfig(lr=0.1), 4096) == 0.1
    assert scaled_lr(OptimConfig(lr=0.1, scale_lr=True, base_batch=512), 4096) == pytest.approx(0.8)
    sched = build_schedule(ScheduleConfig(), OptimConfig(lr=0.1, scale_lr=True, base_batch=512), 10, 1024)
    assert sched(0) == pytest.approx(0.2)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4, 2)
        self.bn1 = nn.BatchNorm1d(2)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(5, 2))


def _ids(params):
    return {id(p) for p in params}


def test_param_groups_follow_the_reference_rule():
    net, head = _Net(), _Head()
    groups = {g["name"]: g for g in param_groups(net, head, OptimConfig(weight_decay=5e-4))}
    assert _ids(groups["decay"]["params"]) == _ids([net.conv.weight, net.fc.weight, head.weight])
    assert groups["decay"]["weight_decay"] == 5e-4
    assert _ids(groups["no_decay"]["params"]) == _ids([net.conv.bias, net.bn.weight, net.bn.bias, net.act.weight,
                                                       net.fc.bias, net.bn1.weight, net.bn1.bias])
    assert groups["no_decay"]["weight_decay"] == 0.0
    all_params = _ids(list(net.parameters()) + list(head.parameters()))
    assert _ids(groups["decay"]["params"]) | _ids(groups["no_decay"]["params"]) == all_params


def test_param_groups_are_configurable():
    net, head = _Net(), _Head()
    groups = param_groups(net, head, OptimConfig(decay_norm_and_bias=True))
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(net.parameters())) + 1
    groups = {g["name"]: g for g in param_groups(net, head, OptimConfig(decay_head=False))}
    assert id(head.weight) in _ids(groups["no_decay"]["params"])


def test_weight_decay_only_shrinks_decayed_params():
    net, head = _Net(), _Head()
    head.weight.data.fill_(1.0)
    opt = build_optimizer(param_groups(net, head, OptimConfig(weight_decay=0.1, momentum=0.0)),
                          OptimConfig(momentum=0.0), lr=1.0)
    bn_before = net.bn.weight.detach().clone()
    for p in list(net.parameters()) + list(head.parameters()):
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(head.weight, torch.full_like(head.weight, 0.9))
    assert torch.equal(net.bn.weight, bn_before)
    assert math.isclose(opt.param_groups[0]["lr"], 1.0)
