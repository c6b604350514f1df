"""Training-time corruption for the masked paradigm: Perlin anomalies, thin scars and masked patches.

Images arrive normalized by the pre-processor. They are brought back to pixel space, corrupted
there (anomalib's :class:`PerlinAnomalyGenerator` for the synthetic anomalies, thin scars in the
manner of CutPaste-Scar, random patches replaced by noise for the masking) and normalized again. Nothing here
runs at inference.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS


class Corruption(nn.Module):
    """Corrupt a batch of normalized images; return the corrupted batch and a ``(B, 1, H, W)`` mask.

    Args:
        mean: Per-channel mean of the pre-processor's normalization (``None``: images in [0, 1]).
        std: Per-channel std of the pre-processor's normalization.
        anomaly_source_path: Optional folder of texture images (e.g. DTD) to fill the Perlin regions;
            without it, anomalib's noise textures are used.
        perlin_probability: Probability that an image gets a Perlin anomaly.
        mask_probability: Probability that an image gets masked patches.
        mask_ratio: Fraction of the patches masked in an image that gets masking.
        mask_patch_size: Side of a masked patch, in pixels of the model input.
        shade_ratio: Fraction of the Perlin anomalies that change the brightness of the image's own pixels
            inside the Perlin region (a gain drawn from ``shade_gain``, darker or brighter at random) instead
            of blending in a foreign texture: shading defects such as stains or uneven coating.
        shade_gain: Range of the brightness gain factor (and of its inverse, for darkening).
        scar_probability: Probability that an image gets a thin scar: a rotated strip of ``scar_width`` by
            ``scar_length`` pixels (at 256 px; scaled with the image's shorter side) filled with the image's own
            pixels from elsewhere (see :meth:`scars`), darkened or brightened by a gain from ``shade_gain``
            (CutPaste-Scar's idea, thinner and with a visible contrast): crack- and scratch-like defects, which
            the Perlin regions and 16-px patches are too wide to imitate.
        scar_width: Range of a scar's width, in pixels of a 256-px image.
        scar_length: Range of a scar's length, in pixels of a 256-px image.
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        anomaly_source_path: str | Path | None = None,
        perlin_probability: float = 0.5,
        mask_probability: float = 0.5,
        mask_ratio: float = 0.1,
        mask_patch_size: int = 16,
        shade_ratio: float = 0.0,
        shade_gain: tuple[float, float] = (1.2, 2.0),
        scar_probability: float = 0.5,
        scar_width: tuple[float, float] = (2.0, 8.0),
        scar_length: tuple[float, float] = (16.0, 64.0),
    ) -> None:
        super().__init__()
        for name, value in {
            "perlin_probability": perlin_probability,
            "mask_probability": mask_probability,
            "mask_ratio": mask_ratio,
            "shade_ratio": shade_ratio,
            "scar_probability": scar_probability,
        }.items():
            if not 0 <= value <= 1:
                msg = f"{name} must lie in [0, 1], got {value}."
                raise ValueError(msg)
        if anomaly_source_path is not None and not Path(anomaly_source_path).is_dir():
            msg = f"anomaly_source_path {anomaly_source_path} is not a folder of texture images."
            raise FileNotFoundError(msg)
        self.register_buffer(
            "mean", torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0]).view(1, -1, 1, 1), persistent=False)
        self.perlin = PerlinAnomalyGenerator(anomaly_source_path=anomaly_source_path, probability=perlin_probability)
        if anomaly_source_path is not None and not self.perlin.anomaly_source_paths:
            msg = (
                f"anomaly_source_path {anomaly_source_path} contains no images. anomalib searches it and its "
                f"sub-folders for files ending in {', '.join(IMG_EXTENSIONS)} (lower case only: rename e.g. *.JPG)."
            )
            raise FileNotFoundError(msg)
        self.mask_probability = mask_probability
        self.mask_ratio = mask_ratio
        self.mask_patch_size = mask_patch_size
        if not 1 <= shade_gain[0] <= shade_gain[1]:
            msg = f"shade_gain must be a range (low, high) with 1 <= low <= high, got {shade_gain}."
            raise ValueError(msg)
        self.shade_ratio = shade_ratio
        self.shade_log_gain = (math.log(shade_gain[0]), math.log(shade_gain[1]))
        for name, (low, high) in {"scar_width": scar_width, "scar_length": scar_length}.items():
            if not 0 < low <= high:
                msg = f"{name} must be a range (low, high) of pixels with 0 < low <= high, got {(low, high)}."
                raise ValueError(msg)
        self.scar_probability = scar_probability
        self.scar_width = scar_width
        self.scar_length = scar_length

    def log_gains(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(B, 1, 1, 1)`` logarithms of brightness gains from ``shade_gain``, darkening or brightening at random."""
        low, high = self.shade_log_gain
        log_gain = low + (high - low) * torch.rand(batch, 1, 1, 1, device=device)
        return torch.where(torch.rand(batch, 1, 1, 1, device=device) < 0.5, -log_gain, log_gain)

    def shade(self, pixels: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Turn a ``shade_ratio`` share of the Perlin anomalies into brightness changes of the image itself."""
        shape, device = (pixels.shape[0], 1, 1, 1), pixels.device
        chosen = (torch.rand(shape, device=device) < self.shade_ratio) & (mask.amax((1, 2, 3), keepdim=True) > 0)
        shaded = pixels * torch.exp(self.log_gains(pixels.shape[0], device) * mask)
        return torch.where(chosen, shaded, corrupted)

    def scars(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a thin scar on a ``scar_probability`` share of ``images`` (pixel space); return them and the mask.

        The fill is ``images`` rolled by one random shift per batch (so it may carry a piece of a Perlin anomaly),
        times a gain. A scar is at least 1 px wide, also on inputs far below 256 px.
        """
        batch, _, height, width = images.shape
        device, scale = images.device, min(height, width) / 256

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, 1, 1, 1, device=device)

        centre_y, centre_x = uniform(0, height), uniform(0, width)
        angle = uniform(0, math.pi)
        rows = torch.arange(height, device=device).view(1, 1, -1, 1) + 0.5 - centre_y
        columns = torch.arange(width, device=device).view(1, 1, 1, -1) + 0.5 - centre_x
        along = columns * angle.cos() + rows * angle.sin()
        across = rows * angle.cos() - columns * angle.sin()
        chosen = torch.rand(batch, 1, 1, 1, device=device) < self.scar_probability
        mask = (along.abs() <= uniform(*self.scar_length) * scale / 2) & (
            across.abs() <= (uniform(*self.scar_width) * scale).clamp_min(1.0) / 2
        )
        mask = (mask & chosen).to(images.dtype)
        shift = (int(torch.randint(height, ())), int(torch.randint(width, ())))
        fill = images.roll(shift, dims=(-2, -1)) * self.log_gains(batch, device).exp()
        return images * (1 - mask) + fill.clamp(0, 1) * mask, mask

    def mask_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace random square patches of some images by uniform noise."""
        batch, _, height, width = images.shape
        grid = (-(-height // self.mask_patch_size), -(-width // self.mask_patch_size))
        chosen = torch.rand(batch, 1, 1, 1, device=images.device) < self.mask_probability
        patches = (torch.rand(batch, 1, *grid, device=images.device) < self.mask_ratio) & chosen
        mask = F.interpolate(patches.float(), scale_factor=self.mask_patch_size, mode="nearest")[..., :height, :width]
        noise = torch.rand_like(images)
        return images * (1 - mask) + noise * mask, mask

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt normalized ``images``; the mask is 1 where pixels changed."""
        pixels = (images * self.std + self.mean).clamp(0, 1)
        if pixels.shape[1] == 1:  # the Perlin textures are RGB
            pixels = pixels.expand(-1, 3, -1, -1)
        corrupted, perlin_mask = self.perlin(pixels)
        # With anomaly_source_path, anomalib's texture augmenters can hand torchvision's hue jitter values a
        # hair below 0, which it turns into NaN; one such image would poison the whole batch (BatchNorm), so
        # it keeps its clean pixels instead (measured: about one texture anomaly in a few thousand).
        broken = ~torch.isfinite(corrupted).flatten(1).all(dim=1).view(-1, 1, 1, 1)
        if broken.any():
            corrupted = torch.where(broken, pixels, corrupted)
            perlin_mask = torch.where(broken, torch.zeros_like(perlin_mask), perlin_mask)
        if self.shade_ratio > 0:
            corrupted = self.shade(pixels, corrupted, perlin_mask.to(pixels.dtype))
        mask = perlin_mask.to(pixels.dtype)
        if self.scar_probability > 0:
            corrupted, scar_mask = self.scars(corrupted)
            mask = torch.maximum(mask, scar_mask)
        corrupted, patch_mask = self.mask_patches(corrupted)
        corrupted = corrupted[:, : images.shape[1]].clamp(0, 1)
        mask = torch.maximum(mask, patch_mask)
        # An image that drew no anomaly stays the very same tensor (not a rounded round trip through pixel space),
        # so the teacher-feature cache recognizes it.
        untouched = mask.flatten(1).amax(dim=1).view(-1, 1, 1, 1) == 0
        return torch.where(untouched, images, (corrupted - self.mean) / self.std), mask
