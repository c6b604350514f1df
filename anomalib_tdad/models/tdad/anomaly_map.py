"""Anomaly map: per-level teacher-student cosine distance, upsampled, summed and smoothed."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components import GaussianBlur2d
from torch import nn

from .loss import cosine_distance


class AnomalyMapGenerator(nn.Module):
    """Turn teacher and student features into a ``(B, 1, H, W)`` anomaly map.

    Args:
        sigma: Standard deviation, in pixels of the input image, of the Gaussian smoothing.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        self.blur = GaussianBlur2d(sigma=sigma, channels=1, kernel_size=kernel_size)

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
    ) -> torch.Tensor:
        """Sum of the upsampled per-level distances, Gaussian-smoothed."""
        anomaly_map = sum(
            F.interpolate(cosine_distance(t, s).unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)
            for t, s in zip(teacher, student, strict=True)
        )
        return self.blur(anomaly_map)


def image_score(anomaly_map: torch.Tensor, topk_ratio: float = 0.0) -> torch.Tensor:
    """Image score from the map: its maximum, or the mean of its ``topk_ratio`` highest pixels."""
    flat = anomaly_map.flatten(1)
    if topk_ratio <= 0:
        return flat.amax(dim=1)
    k = max(1, int(flat.shape[1] * topk_ratio))
    return flat.topk(k, dim=1).values.mean(dim=1)
