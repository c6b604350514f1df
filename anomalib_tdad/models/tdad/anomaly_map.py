"""Anomaly map: per-level teacher-student cosine distance, standardized, upsampled, weighted, summed, smoothed."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components import DynamicBufferMixin
from kornia.filters import get_gaussian_kernel1d
from torch import nn

from .loss import cosine_distance
from .utils import resize


class SeparableGaussianBlur(nn.Module):
    """Gaussian smoothing of ``(B, 1, H, W)`` maps, reflect-padded to the same size, as two matrix products.

    The same result as anomalib's ``GaussianBlur2d`` with a ``2 * int(4 * sigma + 0.5) + 1`` kernel. A 1-D blur
    with reflect padding is a fixed ``(n, n)`` banded matrix; blurring the rows and then the columns of a map
    with those matrices is two GEMMs, which a CPU runs several times faster than single-channel convolutions
    (8x at 256 px on 2 cores) for the same numbers up to rounding. A matrix product costs ``H + W``
    multiply-adds per pixel against the kernel's ``2 k``, so maps with a side above ``max_matrix_size`` are
    blurred by two 1-D convolutions instead. The kernel follows from ``sigma`` and is not saved; the matrices
    follow from the map size.
    """

    def __init__(self, sigma: float, max_matrix_size: int = 512) -> None:
        super().__init__()
        self.max_matrix_size = max_matrix_size
        self.padding = int(4.0 * sigma + 0.5)
        kernel = get_gaussian_kernel1d(2 * self.padding + 1, sigma).view(1, 1, -1)
        self.register_buffer("kernel", kernel, persistent=False)

    def operator(self, size: int, like: torch.Tensor) -> torch.Tensor:
        """``(size, size)`` matrix ``M`` such that ``rows @ M`` blurs each row (reflect padding)."""
        identity = torch.eye(size, dtype=like.dtype, device=like.device).unsqueeze(1)
        padded = F.pad(identity, [self.padding, self.padding], mode="reflect")
        return F.conv1d(padded, self.kernel.to(like.dtype)).squeeze(1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Blur along the width, then along the height."""
        height, width = maps.shape[-2:]
        if max(height, width) > self.max_matrix_size:
            kernel = self.kernel.unsqueeze(0).to(maps.dtype)
            padded = F.pad(maps, [self.padding] * 4, mode="reflect")
            return F.conv2d(F.conv2d(padded, kernel), kernel.transpose(-1, -2))
        return self.operator(height, maps).transpose(0, 1) @ (maps @ self.operator(width, maps))


class Moments(DynamicBufferMixin):
    """Per-position mean and standard deviation of one level's distances; a checkpoint's shapes load as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 1, 1, 1))
        self.register_buffer("std", torch.ones(1, 1, 1, 1))


class LevelStatistics(nn.Module):
    """Per-level, per-position mean and standard deviation of the distances on normal training images.

    The student reproduces some levels and some positions (image borders, for instance) worse than
    others on perfectly normal images. Standardizing each level's distance map with its own normal
    statistics (as PaDiM does with features) turns every level into "how unusual is this distance
    here", so the levels add up on one scale. Before :meth:`fit` runs the statistics are the identity
    (mean 0, std 1) and the maps are the raw distances.

    Args:
        levels: Number of teacher levels.
        min_std: Floor of the standard deviation, as a fraction of the level's mean standard deviation.
    """

    def __init__(self, levels: int, min_std: float = 0.1) -> None:
        super().__init__()
        self.levels = nn.ModuleList(Moments() for _ in range(levels))
        self.min_std = min_std

    @torch.no_grad()
    def fit(self, sums: Sequence[torch.Tensor], squares: Sequence[torch.Tensor], count: int) -> None:
        """Set the statistics from per-level sums and sums of squares (``(h, w)`` each) over ``count`` maps."""
        if count < 2:
            msg = f"Need at least 2 normal training images for the map statistics, got {count}."
            raise ValueError(msg)
        for moments, total, square in zip(self.levels, sums, squares, strict=True):
            mean = total.double() / count  # the variance in float64: E[d²] - E[d]² cancels when std << mean
            std = ((square.double() - count * mean**2).clamp_min(0) / (count - 1)).sqrt().float()
            std = std.clamp_min(self.min_std * std.mean().item() + 1e-6)
            mean = mean.float()
            moments.mean = mean.reshape(1, 1, *mean.shape).clone()
            moments.std = std.reshape(1, 1, *std.shape).clone()

    def forward(self, distances: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Standardize ``(B, 1, h, w)`` distance maps, one per level (statistics resized to each map)."""
        return [
            (distance - resize(moments.mean, distance.shape[-2:])) / resize(moments.std, distance.shape[-2:])
            for moments, distance in zip(self.levels, distances, strict=True)
        ]


def level_distances(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``(B, 1, h, w)`` cosine distance between teacher and student at every level."""
    return [cosine_distance(t, s).unsqueeze(1) for t, s in zip(teacher, student, strict=True)]


class AnomalyMapGenerator(nn.Module):
    """Turn teacher and student features into a ``(B, 1, H, W)`` anomaly map.

    Args:
        levels: Number of teacher levels.
        sigma: Standard deviation, in pixels of the input image, of the Gaussian smoothing.
        standardize: Standardize each level with its normal statistics (:class:`LevelStatistics`) before
            summing; otherwise sum the raw distances.
        level_weights: Weight of each level in the sum, finest first (``None``: 1 for every level).
    """

    def __init__(
        self, levels: int, sigma: float = 4.0, standardize: bool = True, level_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        weights = [1.0] * levels if level_weights is None else [float(weight) for weight in level_weights]
        if len(weights) != levels or min(weights) < 0 or sum(weights) == 0:
            msg = (
                f"level_weights must be {levels} non-negative numbers, not all 0 (one per layer), got {level_weights}."
            )
            raise ValueError(msg)
        self.level_weights = weights
        self.blur = SeparableGaussianBlur(sigma)
        self.statistics = LevelStatistics(levels)
        self.standardize = standardize

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
    ) -> torch.Tensor:
        """Weighted sum of the (standardized) per-level distances, upsampled to ``image_size`` and smoothed."""
        distances = level_distances(teacher, student)
        if self.standardize:
            distances = self.statistics(distances)
        anomaly_map = sum(
            weight * resize(distance, image_size)
            for weight, distance in zip(self.level_weights, distances, strict=True)
            if weight > 0
        )
        return self.blur(anomaly_map)


def image_score(anomaly_map: torch.Tensor, topk_ratio: float = 0.0) -> torch.Tensor:
    """Image score from the map: its maximum, or the mean of its ``topk_ratio`` highest pixels."""
    flat = anomaly_map.flatten(1)
    if topk_ratio <= 0:
        return flat.amax(dim=1)
    k = max(1, int(flat.shape[1] * topk_ratio))
    return flat.topk(k, dim=1).values.mean(dim=1)
