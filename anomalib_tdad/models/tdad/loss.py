"""TDAD's three distillation losses: GKD, SCD and DMD."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def cosine_distance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` over the channel axis: ``(B, C, H, W) x2 -> (B, H, W)``, in ``[0, 2]``."""
    return 1 - F.cosine_similarity(first, second, dim=1)


class TdadLoss(nn.Module):
    """Weighted sum of the three distillations.

    Args:
        lambda_gkd: Weight of general knowledge distillation, ``d(T(x), S(x))``.
        lambda_scd: Weight of self-consistency distillation, ``d(T(x), S(x~))``: from the corrupted
            view, reproduce the teacher's features of the clean image.
        lambda_dmd: Weight of discrepancy maximization distillation, ``max(0, m - d(T(x~), S(x~)))``
            averaged inside the corrupted regions only.
        margin: The margin ``m`` of DMD, in cosine distance.

    A term with weight 0 is not computed at all.
    """

    def __init__(
        self, lambda_gkd: float = 1.0, lambda_scd: float = 1.0, lambda_dmd: float = 1.0, margin: float = 0.5
    ) -> None:
        super().__init__()
        if min(lambda_gkd, lambda_scd, lambda_dmd) < 0 or lambda_gkd + lambda_scd + lambda_dmd == 0:
            msg = f"Loss weights must be >= 0 and not all 0, got {(lambda_gkd, lambda_scd, lambda_dmd)}."
            raise ValueError(msg)
        if not 0 < margin <= 2:
            msg = f"margin is a cosine distance and must lie in (0, 2], got {margin}."
            raise ValueError(msg)
        self.weights = {"gkd": lambda_gkd, "scd": lambda_scd, "dmd": lambda_dmd}
        self.margin = margin

    @property
    def needs_corruption(self) -> bool:
        """Whether any term uses the corrupted view (plain reverse distillation does not)."""
        return self.weights["scd"] > 0 or self.weights["dmd"] > 0

    @staticmethod
    def gkd(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum over levels of the mean distance between teacher and student features."""
        return sum(cosine_distance(t, s).mean() for t, s in zip(teacher, student, strict=True))

    def dmd(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Sum over levels of the hinge ``max(0, m - d)`` averaged over the (resized, soft) mask."""
        total = mask.new_zeros(())
        for t, s in zip(teacher, student, strict=True):
            weight = F.interpolate(mask, size=t.shape[-2:], mode="area").squeeze(1)
            hinge = torch.relu(self.margin - cosine_distance(t, s))
            total = total + (weight * hinge).sum() / weight.sum().clamp_min(1e-6)
        return total

    def forward(
        self,
        teacher_clean: Sequence[torch.Tensor],
        student_clean: Sequence[torch.Tensor],
        teacher_corrupt: Sequence[torch.Tensor] | None = None,
        student_corrupt: Sequence[torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the total loss and the unweighted terms that were computed.

        Args:
            teacher_clean: Teacher features of the clean images, one tensor per level.
            student_clean: Student features reconstructed from ``teacher_clean``.
            teacher_corrupt: Teacher features of the corrupted images (needed for SCD/DMD).
            student_corrupt: Student features reconstructed from ``teacher_corrupt``.
            mask: ``(B, 1, H, W)`` mask in ``[0, 1]`` of the corrupted pixels (needed for DMD).
        """
        terms: dict[str, torch.Tensor] = {}
        if self.weights["gkd"] > 0:
            terms["gkd"] = self.gkd(teacher_clean, student_clean)
        if self.needs_corruption and (student_corrupt is None or teacher_corrupt is None):
            msg = "SCD and DMD need the teacher and student features of the corrupted images."
            raise ValueError(msg)
        if self.weights["scd"] > 0:
            terms["scd"] = self.gkd(teacher_clean, student_corrupt)
        if self.weights["dmd"] > 0:
            if mask is None:
                msg = "DMD needs the corruption mask."
                raise ValueError(msg)
            terms["dmd"] = self.dmd(teacher_corrupt, student_corrupt, mask)
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms
