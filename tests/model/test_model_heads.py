"""Margins and FCHead against float64 reference formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lresnet.model.heads import ArcFace, CombinedMargin, CosFace, FCHead, check_labels
from lresnet.model.partial_fc import PartialFC, create_head


def reference_target(
    c: float, kind: str, s: float, m: float = 0.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0
) -> float:
    """The target logit, straight from the papers' formulas, in Python floats (float64)."""
    theta = math.acos(c)
    if kind == "arcface":
        if c > math.cos(math.pi - m):
            return s * math.cos(theta + m)
        return s * (c - m * math.sin(m))
    if kind == "cosface":
        return s * (c - m)
    theta_max = (math.pi - m2) / m1
    if theta_max < math.pi and c <= math.cos(theta_max):
        return s * (c - (math.pi - theta_max) * math.sin(theta_max) - m3)
    return s * (math.cos(m1 * theta + m2) - m3)


def reference_logits(cosine: torch.Tensor, labels: torch.Tensor, kind: str, **params: float) -> torch.Tensor:
    s = params["s"]
    out = cosine.double() * s
    for row, label in enumerate(labels.tolist()):
        if label != -1:
            out[row, label] = reference_target(float(cosine[row, label]), kind, **params)
    return out


# Target cosines spread over [-1, 1], including both sides of ArcFace's threshold cos(pi - 0.5) = -0.8776,
# the exact ends, and the threshold of the combined margins below.
TARGETS = [-1.0, -0.99, -0.95, -0.9, -0.88, -0.87, -0.5, -0.1, 0.0, 0.3, 0.7, 0.95, 0.999, 1.0]

MARGINS = [
    ("arcface", ArcFace(s=64.0, m=0.5), dict(s=64.0, m=0.5)),
    ("arcface", ArcFace(s=30.0, m=0.3), dict(s=30.0, m=0.3)),
    ("cosface", CosFace(s=64.0, m=0.4), dict(s=64.0, m=0.4)),
    ("combined", CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2), dict(s=64.0, m1=1.0, m2=0.3, m3=0.2)),
    ("combined", CombinedMargin(s=64.0, m1=1.35, m2=0.25, m3=0.1), dict(s=64.0, m1=1.35, m2=0.25, m3=0.1)),
    ("combined", CombinedMargin(s=32.0, m1=0.9, m2=0.2, m3=0.0), dict(s=32.0, m1=0.9, m2=0.2, m3=0.0)),
]


def make_case(num_classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine matrix whose target entries are TARGETS, plus two rows labelled -1."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(TARGETS) + 2
    cosine = torch.rand(rows, num_classes, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, num_classes, (rows,), generator=gen)
    labels[3] = -1
    labels[-1] = -1
    targets = iter(TARGETS)
    for row in range(rows):
        if labels[row] != -1:
            cosine[row, labels[row]] = next(targets)
    return cosine, labels


@pytest.mark.parametrize("kind, margin, params", MARGINS, ids=[repr(m) for _, m, _ in MARGINS])
def test_margin_logits_match_float64_reference(kind, margin, params):
    cosine, labels = make_case()
    expected = reference_logits(cosine, labels, kind, **params)
    got64 = margin(cosine, labels)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, rtol=0, atol=1e-6)  # acos clamp near +-1 is ~1e-7 in fp64
    got32 = margin(cosine.float(), labels)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=params["s"] * 1e-3)
    # away from +-1 (where fp32's acos clamp sits) fp32 is accurate to a few ulps of s
    inner = cosine.abs() < 0.999
    torch.testing.assert_close(got32.double()[inner], expected[inner], rtol=0, atol=params["s"] * 2e-6)


@pytest.mark.parametrize("margin", [ArcFace(), CosFace(), CombinedMargin(m1=1.2, m2=0.3, m3=0.1)], ids=repr)
def test_ignored_rows_and_non_targets_are_only_scaled(margin):
    cosine, labels = make_case()
    logits = margin(cosine, labels)
    changed = torch.zeros_like(cosine, dtype=torch.bool)
    valid = labels != -1
    changed[valid.nonzero().squeeze(1), labels[valid]] = True
    assert torch.equal(logits[~changed], cosine[~changed] * margin.s)
    assert torch.equal(logits[~valid], cosine[~valid] * margin.s)  # label -1 rows untouched
    assert not torch.equal(logits[changed], cosine[changed] * margin.s)


def test_arcface_fallback_region_is_the_standard_one():
    m = 0.5
    th = math.cos(math.pi - m)
    cosine = torch.tensor([[th - 1e-6, 0.0], [th + 1e-6, 0.0], [th, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    got = ArcFace(s=1.0, m=m)(cosine, labels)[:, 0]
    assert got[0].item() == pytest.approx(th - 1e-6 - m * math.sin(m), abs=1e-12)
    assert got[1].item() == pytest.approx(math.cos(math.acos(th + 1e-6) + m), abs=1e-9)
    assert got[2].item() == pytest.approx(th - m * math.sin(m), abs=1e-12)  # cos(theta) <= th falls back
    assert got[3].item() == pytest.approx(-1.0 - m * math.sin(m), abs=1e-12)


def test_combined_margin_reduces_to_arcface_and_cosface():
    cosine, labels = make_case(seed=3)
    torch.testing.assert_close(
        CombinedMargin(s=64.0, m1=1.0, m2=0.5, m3=0.0)(cosine, labels), ArcFace(s=64.0, m=0.5)(cosine, labels)
    )
    torch.testing.assert_close(
        CombinedMargin(s=64.0, m1=1.0, m2=0.0, m3=0.35)(cosine, labels), CosFace(s=64.0, m=0.35)(cosine, labels)
    )


@pytest.mark.parametrize("margin", [ArcFace(), CosFace(), CombinedMargin(m1=1.2, m2=0.3, m3=0.1)], ids=repr)
def test_margin_gradients_finite_at_exact_plus_minus_one(margin):
    cosine = torch.tensor([[1.0, 0.2], [-1.0, 0.1], [0.3, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, -1])
    margin(cosine, labels).sum().backward()
    assert torch.isfinite(cosine.grad).all()


def test_margin_math_is_fp32_under_bf16_autocast():
    cosine, labels = make_case()
    expected = ArcFace()(cosine.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ArcFace()(cosine.float(), labels)
        got_from_bf16 = ArcFace()(cosine.to(torch.bfloat16), labels)
    assert got.dtype == torch.float32 and got_from_bf16.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def reference_fc_loss(embeddings, weight, labels, kind, **params) -> torch.Tensor:
    cosine = F.normalize(embeddings.double(), dim=1) @ F.normalize(weight.double(), dim=1).t()
    logits = reference_logits(cosine, labels, kind, **params)
    keep = labels != -1
    return F.cross_entropy(logits[keep], labels[keep])


@pytest.mark.parametrize("kind, margin, params", MARGINS[:4], ids=[repr(m) for _, m, _ in MARGINS[:4]])
def test_fc_head_loss_matches_reference(kind, margin, params):
    torch.manual_seed(0)
    head = FCHead(margin, embedding_size=16, num_classes=9)
    embeddings = torch.randn(10, 16)
    labels = torch.tensor([0, 3, -1, 8, 8, 2, -1, 5, 1, 0])
    loss = head(embeddings, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expected = reference_fc_loss(embeddings, head.weight.detach(), labels, kind, **params)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_fc_head_gradients_match_autograd_of_reference():
    torch.manual_seed(1)
    head = FCHead(ArcFace(s=16.0, m=0.5), embedding_size=6, num_classes=5).double()
    embeddings = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, -1, 2, 2, 1, 3])
    weight = head.weight.detach().clone().requires_grad_()

    def loss(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(head, {"weight": w}, (e, labels))

    assert torch.autograd.gradcheck(loss, (embeddings, weight))


def test_fc_head_is_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    head = FCHead(ArcFace(), embedding_size=32, num_classes=50)
    embeddings = torch.randn(12, 32)
    labels = torch.randint(0, 50, (12,))
    expected = head(embeddings, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = torch.nn.functional.linear(embeddings, torch.eye(32))  # bf16 output, as from a backbone
        assert projected.dtype == torch.bfloat16
        loss = head(projected, labels)
        loss_fp32_input = head(embeddings, labels)
    assert loss.dtype == torch.float32
    # Same fp32 math: the only difference is the bf16 rounding of the input embeddings.
    torch.testing.assert_close(loss_fp32_input, expected, rtol=1e-6, atol=0)
    expected_bf16 = head(projected.float(), labels)
    torch.testing.assert_close(loss, expected_bf16, rtol=1e-6, atol=0)


def test_fc_head_ignores_label_minus_one():
    torch.manual_seed(3)
    head = FCHead(CosFace(), embedding_size=8, num_classes=6)
    embeddings = torch.randn(5, 8)
    labels = torch.tensor([1, -1, 4, -1, 0])
    keep = labels != -1
    torch.testing.assert_close(head(embeddings, labels), head(embeddings[keep], labels[keep]))
    none = head(embeddings, torch.full((5,), -1))
    none.backward()
    assert none.item() == 0.0 and torch.count_nonzero(head.weight.grad) == 0


def test_fc_head_init_and_state_dict_round_trip():
    torch.manual_seed(4)
    head = FCHead(ArcFace(), embedding_size=64, num_classes=300)
    assert head.weight.shape == (300, 64)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    other = FCHead(ArcFace(), embedding_size=64, num_classes=300)
    other.load_full_state_dict(head.full_state_dict())
    assert torch.equal(other.weight, head.weight)
    with pytest.raises(ValueError, match=r"expected \(301, 64\)"):
        FCHead(ArcFace(), 64, 301).load_full_state_dict(head.full_state_dict())


@pytest.mark.parametrize("bad", [[0, 6], [-2, 1]])
def test_out_of_range_labels_are_refused(bad):
    head = FCHead(ArcFace(), embedding_size=4, num_classes=6)
    with pytest.raises(ValueError, match="out of range"):
        head(torch.randn(2, 4), torch.tensor(bad))
    with pytest.raises(ValueError, match="integer"):
        check_labels(torch.tensor([0.0, 1.0]), 6)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ArcFace(s=0.0), "scale s"),
        (lambda: ArcFace(m=4.0), "ArcFace margin"),
        (lambda: CombinedMargin(m1=0.0), "m1"),
        (lambda: CombinedMargin(m2=-0.1), "m2"),
        (lambda: FCHead(ArcFace(), 0, 5), "embedding_size"),
        (lambda: create_head("sphereface", 8, 10), "expected one of arcface, cosface, combined"),
        (lambda: create_head("arcface", 8, 10, sample_rate=0.5, partial_fc=False), "partial_fc=True"),
    ],
)
def test_bad_arguments_say_what_was_expected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_create_head_rule():
    assert isinstance(create_head("arcface", 8, 10), FCHead)
    assert create_head("arcface", 8, 10).margin == ArcFace(s=64.0, m=0.5)
    assert create_head("cosface", 8, 10, s=30.0).margin == CosFace(s=30.0, m=0.4)
    assert create_head("combined", 8, 10, m1=1.0, m2=0.3, m3=0.2).margin == CombinedMargin(64.0, 1.0, 0.3, 0.2)
    assert isinstance(create_head("arcface", 8, 10, sample_rate=0.5), PartialFC)
    assert isinstance(create_head("arcface", 8, 10, partial_fc=True), PartialFC)
    sharded = create_head("arcface", 8, 10, rank=1, world_size=2)
    assert isinstance(sharded, PartialFC) and (sharded.class_start, sharded.class_end) == (5, 10)
    assert isinstance(create_head("arcface", 8, 10, rank=1, world_size=2, partial_fc=False), FCHead)


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_heads_on_cuda_under_autocast_match_cpu_fp32(amp_dtype):
    torch.manual_seed(5)
    embeddings = torch.randn(32, 64)
    labels = torch.randint(-1, 1000, (32,))
    for head in (FCHead(ArcFace(), 64, 1000), PartialFC(CombinedMargin(m1=1.0, m2=0.3, m3=0.2), 64, 1000)):
        expected = head(embeddings, labels)
        head.cuda()
        with torch.autocast("cuda", dtype=amp_dtype):
            loss = head(embeddings.cuda().to(amp_dtype), labels.cuda())
        assert loss.dtype == torch.float32
        reference = head(embeddings.to(amp_dtype).float().cuda(), labels.cuda())
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.cpu(), expected, rtol=1e-2, atol=0)  # only the input rounding differs
