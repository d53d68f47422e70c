"""The loop in-process: the loss falls, non-finite steps are skipped then abort, AMP paths on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from lresnet.train.checkpoint import load_checkpoint
from lresnet.train.loop import TrainingAborted, train


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_loss_falls_and_metrics_are_complete(tiny_config, tmp_path):
    cfg = tiny_config(schedule={"max_steps": 40}, checkpoint={"every": 20})
    result = train(cfg)
    assert result.steps == 40 and result.skipped_steps == 0
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "lr", "images_per_s", "images_per_s_step", "data_wait", "grad_norm"):
        assert key in record
    assert 0.0 <= record["data_wait"] <= 1.0
    assert record["images_per_s_step"] >= record["images_per_s"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["schedule"]["max_steps"] == 40
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt-00000040.pt")
    assert ckpt["step"] == 40 and ckpt["head"]["weight"].shape == (16, 32)
    # 128 samples / batch 16 = 8 steps per epoch: step 40 is the end of epoch 4
    assert (ckpt["loader"][0]["epoch"], ckpt["loader"][0]["position"]) == (4, 8)


def test_in_run_verification_is_logged_and_picks_the_best(tiny_config, tiny_shards, tmp_path):
    cfg = tiny_config(schedule={"max_steps": 16}, eval={"val": str(tiny_shards[1]), "every": 8,
                                                        "at_epoch_end": False})
    result = train(cfg)
    assert set(result.verification) == {"lfw"}
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "verification" in line]
    assert [e["step"] for e in evals] == [8, 16]
    assert 0.0 <= evals[0]["verification"]["lfw"]["accuracy"] <= 1.0
    accuracies = [e["mean_accuracy"] for e in evals]
    best_step = evals[accuracies.index(max(accuracies))]["step"]  # the first of equal bests
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step"] == best_step
    assert json.loads((tmp_path / "run" / "best.json").read_text()) == {"step": best_step, "metric": max(accuracies)}


class _NaNAt(torch.nn.Module):
    """Wraps a head: the loss is NaN on the listed calls (1-based), or always."""

    def __init__(self, head, bad=None):
        super().__init__()
        self.head, self.bad, self.calls = head, bad, 0

    def forward(self, emb, labels):
        self.calls += 1
        loss = self.head(emb, labels)
        if self.bad is None or self.calls in self.bad:
            return loss * float("nan")
        return loss

    def full_state_dict(self):
        return self.head.full_state_dict()


def _patch_head(monkeypatch, bad):
    import lresnet.model.partial_fc as pfc

    real = pfc.create_head
    monkeypatch.setattr(pfc, "create_head", lambda *a, **k: _NaNAt(real(*a, **k), bad))


def test_non_finite_loss_skips_the_step_and_counts_it(tiny_config, monkeypatch, tmp_path):
    _patch_head(monkeypatch, bad={3, 4})
    result = train(tiny_config(schedule={"max_steps": 8}))
    assert result.steps == 8 and result.skipped_steps == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2, 2, 2]
    weights = load_checkpoint(tmp_path / "run" / "ckpt-00000008.pt")["backbone"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_non_finite_steps_in_a_row_abort_with_a_clear_message(tiny_config, monkeypatch):
    _patch_head(monkeypatch, bad=None)
    with pytest.raises(TrainingAborted, match="not finite for 3 steps in a row"):
        train(tiny_config(max_nonfinite=3))


def _record_conv_dtypes(monkeypatch) -> list:
    import lresnet.model as model

    seen = []
    real = model.create_backbone

    def create(*a, **k):
        net = real(*a, **k)
        first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        return net

    monkeypatch.setattr(model, "create_backbone", create)
    return seen


def test_bf16_autocast_path_on_cpu(tiny_config, monkeypatch, tmp_path):
    seen = _record_conv_dtypes(monkeypatch)
    result = train(tiny_config(amp={"enabled": True, "dtype": "bf16"}, schedule={"max_steps": 6}))
    assert result.steps == 6 and result.skipped_steps == 0
    assert seen and set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "run"))))
    weights = load_checkpoint(tmp_path / "run" / "ckpt-00000006.pt")["backbone"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())  # master weights stay fp32


def test_fp16_path_uses_the_grad_scaler(tiny_config, tmp_path):
    fp32 = tiny_config(out=str(tmp_path / "fp32"), amp={"enabled": False}, schedule={"max_steps": 1})
    train(fp32)
    result = train(tiny_config(amp={"enabled": True, "dtype": "fp16", "loss_scale": 1024.0},
                               schedule={"max_steps": 4}))
    assert result.steps == 4 and result.skipped_steps == 0
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt-00000004.pt")
    assert ckpt["scaler"]["scale"] == 1024.0  # no overflow, and growth only every 2000 steps
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_scale"] == 1024.0 for r in records)
    # the logged norm is of the unscaled gradients: the fp32 run's first step, not 1024 times it
    first_fp32 = json.loads((tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    assert records[0]["grad_norm"] == pytest.approx(first_fp32, rel=0.05)


def test_no_resume_refuses_to_overwrite_an_earlier_run(tiny_config):
    from lresnet.core.errors import InputError

    train(tiny_config(schedule={"max_steps": 2}))
    with pytest.raises(InputError, match="holds checkpoints of an earlier run"):
        train(tiny_config(schedule={"max_steps": 2}, checkpoint={"resume": False}))


def test_resume_continues_a_finished_run_to_more_steps(tiny_config, caplog):
    first = train(tiny_config(schedule={"max_steps": 4}))
    assert first.steps == 4
    with caplog.at_level("WARNING"):
        again = train(tiny_config(schedule={"max_steps": 6}))
    assert (again.start_step, again.steps) == (4, 6)
    assert "schedule.max_steps: 4 -> 6" in caplog.text


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_amp_on_cuda(tiny_config, dtype, tmp_path, monkeypatch):
    seen = _record_conv_dtypes(monkeypatch)
    result = train(tiny_config(dist={"device": "cuda"}, amp={"enabled": True, "dtype": dtype},
                               schedule={"max_steps": 4}))
    assert result.steps == 4 and result.skipped_steps == 0
    assert set(seen) == {torch.bfloat16 if dtype == "bf16" else torch.float16}
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "run"))))
    weights = load_checkpoint(tmp_path / "run" / "ckpt-00000004.pt")["backbone"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())  # fp32 master weights


@pytest.mark.npu
def test_bf16_on_npu(tiny_config, tmp_path, monkeypatch):
    seen = _record_conv_dtypes(monkeypatch)
    result = train(tiny_config(dist={"device": "npu"}, amp={"enabled": True, "dtype": "bf16"},
                               schedule={"max_steps": 4}))
    assert result.steps == 4 and result.skipped_steps == 0
    assert set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "run"))))


def test_start_epoch_shifts_the_schedule(tiny_config, tmp_path):
    # 8 steps per epoch, 2 epochs: --start-epoch 1 runs the second epoch only, at its learning rates
    result = train(tiny_config(schedule={"max_steps": 0, "epochs": 2, "start_epoch": 1, "kind": "cosine"}))
    assert (result.start_step, result.steps) == (8, 16)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 9 and first["lr"] == pytest.approx(0.05)  # cosine half way down from 0.1


def test_gradient_clipping_bounds_the_update(tiny_config, tmp_path):
    from lresnet.train.dist import DistContext
    from lresnet.train.loop import clip_and_norm
    from lresnet.pipeline import World

    ctx = DistContext(World(), 0, torch.device("cpu"), None)
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.full((3,), 3.0)
    params[1].grad = torch.full((4,), 4.0)
    norm = clip_and_norm(params[:1], params[1:], max_norm=1.0, ctx=ctx)
    assert norm.item() == pytest.approx((27 + 64) ** 0.5)
    clipped = torch.cat([p.grad for p in params]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-4)
    train(tiny_config(optim={"grad_clip": 1.0}, schedule={"max_steps": 3}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in records)  # the norm before clipping is what gets logged


def test_tensorboard_scalars_when_installed(tiny_config, tiny_shards, monkeypatch):
    import sys
    import types

    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            return None

        def close(self):
            return None

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train(tiny_config(log={"every": 2, "tensorboard": True}, schedule={"max_steps": 4},
                      eval={"val": str(tiny_shards[1]), "every": 4, "at_epoch_end": False}))
    tags = {tag for tag, _ in scalars}
    assert {"loss", "lr", "images_per_s", "data_wait", "verification/lfw/accuracy"} <= tags
    assert ("loss", 4) in scalars


def test_remote_shards_take_their_counts_from_a_manifest(tiny_config, tiny_shards, tmp_path):
    # what a run streaming from object storage passes: a pipe: pattern plus the manifest for the counts
    train_dir = tiny_shards[0]
    last = len(sorted(train_dir.glob("train-*.tar"))) - 1
    pattern = f"pipe:cat {train_dir}/train-{{000000..{last:06d}}}.tar"
    cfg = tiny_config(data={"shards": pattern, "manifest": str(train_dir / "manifest.json")},
                      schedule={"max_steps": 9})
    result = train(cfg)
    assert result.steps == 9
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt-00000009.pt")
    assert (ckpt["loader"][0]["epoch"], ckpt["loader"][0]["position"]) == (1, 1)


def test_tensorboard_events_are_written_by_the_real_writer(tiny_config, tiny_shards, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train(tiny_config(log={"every": 2, "tensorboard": True}, schedule={"max_steps": 4},
                      eval={"val": str(tiny_shards[1]), "every": 4, "at_epoch_end": False}))
    events = accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "images_per_s", "data_wait", "verification/lfw/accuracy"} <= tags
    losses = {e.step: e.value for e in events.Scalars("loss")}
    logged = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text()
                                                .splitlines()) if "loss" in r}
    assert sorted(losses) == [2, 4] and all(losses[s] == pytest.approx(logged[s]) for s in losses)
