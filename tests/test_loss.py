"""Semantics of the three distillation losses on small tensors."""

from itertools import pairwise

import pytest
import torch

from anomalib_tdad.models.tdad.loss import TdadLoss, cosine_distance


def _features(
    seed: int, sizes: tuple[int, ...] = (8, 4, 2), channels: tuple[int, ...] = (6, 10, 12)
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, s, s, generator=generator) for c, s in zip(channels, sizes, strict=True)]


def _rotate_away(features: list[torch.Tensor], angle: float) -> list[torch.Tensor]:
    """Features whose cosine with ``features`` is cos(angle) everywhere (rotation in a 2-D plane)."""
    rotated = []
    for f in features:
        unit = f / f.norm(dim=1, keepdim=True)
        orthogonal = torch.roll(unit, shifts=1, dims=1)
        orthogonal = orthogonal - (orthogonal * unit).sum(1, keepdim=True) * unit
        orthogonal = orthogonal / orthogonal.norm(dim=1, keepdim=True)
        rotated.append(
            f.norm(dim=1, keepdim=True)
            * (torch.cos(torch.tensor(angle)) * unit + torch.sin(torch.tensor(angle)) * orthogonal)
        )
    return rotated


def test_cosine_distance_range() -> None:
    a = torch.randn(3, 5, 4, 4)
    assert torch.allclose(cosine_distance(a, a), torch.zeros(3, 4, 4), atol=1e-6)
    assert torch.allclose(cosine_distance(a, -a), 2 * torch.ones(3, 4, 4), atol=1e-6)


def test_gkd_and_scd_vanish_when_student_matches_teacher() -> None:
    teacher, corrupt = _features(0), _features(1)
    loss = TdadLoss(lambda_dmd=0)
    total, terms = loss(teacher, [t.clone() for t in teacher], corrupt, [t.clone() for t in teacher])
    assert terms["gkd"].item() == pytest.approx(0, abs=1e-6)
    assert terms["scd"].item() == pytest.approx(0, abs=1e-6)
    assert total.item() == pytest.approx(0, abs=1e-6)
    _, terms = loss(teacher, _features(2), corrupt, _features(3))
    assert terms["gkd"] > 0.5 and terms["scd"] > 0.5  # random features: cosine distance about 1


def test_dmd_ignores_everything_outside_the_mask() -> None:
    teacher = _features(0)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8, :8] = 1  # top-left quarter at every level
    loss = TdadLoss(lambda_gkd=0, lambda_scd=0, lambda_dmd=1)
    student = [t.clone() for t in teacher]
    _, before = loss(teacher, student, teacher, student, mask)
    changed = [s.clone() for s in student]
    for s in changed:
        half = s.shape[-1] // 2
        s[..., half:, :] = torch.randn_like(s[..., half:, :])  # change only outside the mask
        s[..., :, half:] = torch.randn_like(s[..., :, half:])
    _, after = loss(teacher, student, teacher, changed, mask)
    assert after["dmd"].item() == pytest.approx(before["dmd"].item())
    assert before["dmd"].item() == pytest.approx(3 * 0.5)  # student == teacher inside: hinge = margin, 3 levels


def test_dmd_falls_as_discrepancy_grows_and_is_zero_past_the_margin() -> None:
    teacher = _features(0)
    mask = torch.ones(2, 1, 16, 16)
    loss = TdadLoss(lambda_gkd=0, lambda_scd=0, lambda_dmd=1, margin=0.5)
    values = []
    for angle in (0.0, 0.3, 0.6, 0.9):  # cosine distance 1 - cos(angle): 0, 0.045, 0.175, 0.378
        student = _rotate_away(teacher, angle)
        values.append(loss(teacher, student, teacher, student, mask)[1]["dmd"].item())
    assert all(later < earlier for earlier, later in pairwise(values))
    student = _rotate_away(teacher, 1.2)  # distance 0.638 > margin
    assert loss(teacher, student, teacher, student, mask)[1]["dmd"].item() == pytest.approx(0, abs=1e-6)


def test_empty_mask_gives_zero_dmd() -> None:
    teacher = _features(0)
    loss = TdadLoss(lambda_gkd=0, lambda_scd=0, lambda_dmd=1)
    assert loss(teacher, teacher, teacher, teacher, torch.zeros(2, 1, 16, 16))[1]["dmd"].item() == 0


@pytest.mark.parametrize("off", ["gkd", "scd", "dmd"])
def test_a_term_with_weight_zero_contributes_nothing(off: str) -> None:
    teacher, student, corrupt_t, corrupt_s = _features(0), _features(1), _features(2), _features(3)
    mask = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    full_total, full_terms = TdadLoss(margin=1.5)(teacher, student, corrupt_t, corrupt_s, mask)
    weights = {"lambda_gkd": 1.0, "lambda_scd": 1.0, "lambda_dmd": 1.0, f"lambda_{off}": 0.0}
    total, terms = TdadLoss(margin=1.5, **weights)(teacher, student, corrupt_t, corrupt_s, mask)
    assert off not in terms
    assert total.item() == pytest.approx(full_total.item() - full_terms[off].item(), rel=1e-5)


def test_switched_off_terms_are_not_computed() -> None:
    """NaN in features only a switched-off term reads does not leak into the loss."""
    teacher, student, corrupt_t = _features(0), _features(1), _features(2)
    nan = [torch.full_like(f, float("nan")) for f in student]
    mask = torch.ones(2, 1, 16, 16)
    assert torch.isfinite(TdadLoss(lambda_gkd=0)(teacher, nan, corrupt_t, student, mask)[0])
    assert torch.isfinite(TdadLoss(lambda_scd=0, lambda_dmd=0)(teacher, student, corrupt_t, nan, mask)[0])


def test_plain_distillation_needs_no_corruption() -> None:
    assert not TdadLoss(lambda_scd=0, lambda_dmd=0).needs_corruption
    assert TdadLoss(lambda_scd=0).needs_corruption
    teacher = _features(0)
    total, terms = TdadLoss(lambda_scd=0, lambda_dmd=0)(teacher, _features(1))
    assert set(terms) == {"gkd"} and total > 0


@pytest.mark.parametrize(
    "kwargs",
    [{"lambda_gkd": -1.0}, {"lambda_gkd": 0, "lambda_scd": 0, "lambda_dmd": 0}, {"margin": 0.0}, {"margin": 2.5}],
)
def test_invalid_weights_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must"):
        TdadLoss(**kwargs)
