"""The frozen teacher: a timm ``features_only`` CNN at chosen levels, built once.

The levels are read from timm's ``feature_info`` of a model built on the ``meta`` device (no memory, no
weights), so the real teacher is built exactly once, with integer ``out_indices``. ImageNet weights are
loaded with timm's own loader, keeping only the keys the features model has: a features model has no
classifier, so loading the full checkpoint as-is would warn about "unexpected keys" every time.
"""

from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from timm.models import FeatureDictNet, FeatureHooks, FeatureListNet, load_pretrained
from torch import nn

from .utils import exporting

# Strides of the levels TDAD distils by default: a ResNet's layer2, layer3 and layer4.
DEFAULT_STRIDES = (8, 16, 32)
# The default strides of anomalib-tdad 0.1 to 0.4 (PatchCore's), whose checkpoints saved them as ``layers=None``.
LEGACY_STRIDES = (8, 16)
# timm wraps most CNNs in these after loading their weights; their keys are renamed (``stages.0`` -> ``stages_0``).
_WRAPPERS = (FeatureListNet, FeatureDictNet, FeatureHooks)
# Input pixels per teacher call on a CPU (two 256-px images; one 512-px image, eight 128-px ones). Past this, a call's
# activations outgrow the CPU's caches and every image costs more: on 2 AMD EPYC cores (32 MiB L3) the default
# teacher took 14 ms per 256-px image in calls of 2 images, 17-19 ms in calls of 4-8 and 31-37 ms in calls of 16-64
# (`benchmarks/speed.py --teacher-calls`, docs/benchmarks.md).
CPU_CHUNK_PIXELS = 2 * 256 * 256


def images_per_call(height: int, width: int) -> int:
    """Images of ``height`` x ``width`` px the teacher takes per call on a CPU: :data:`CPU_CHUNK_PIXELS`, at least 1."""
    return max(1, CPU_CHUNK_PIXELS // (height * width))


def _create(backbone: str, pretrained: bool = False, **kwargs: object) -> nn.Module:
    return timm.create_model(backbone, pretrained=pretrained, features_only=True, exportable=True, **kwargs)


class _Listing(NamedTuple):
    """What timm's ``feature_info`` says about a backbone's levels, and whether timm wraps its features model."""

    names: tuple[str, ...]
    reductions: tuple[int, ...]
    channels: tuple[int, ...]
    wrapped: bool


@cache
def _listing(backbone: str) -> _Listing:
    """The levels of ``backbone``, read from a features model built on the ``meta`` device (once per backbone)."""
    with torch.device("meta"):
        model = _create(backbone)
    info = model.feature_info
    return _Listing(
        tuple(info.module_name()), tuple(info.reduction()), tuple(info.channels()), isinstance(model, _WRAPPERS)
    )


def select_layers(
    backbone: str, layers: Sequence[str] | None, strides: Sequence[int] = DEFAULT_STRIDES
) -> tuple[list[str], list[int], bool]:
    """Names and ``out_indices`` of the teacher levels, and whether timm wraps this backbone.

    ``layers=None`` picks the levels at ``strides`` (:data:`DEFAULT_STRIDES`) from the backbone's ``feature_info``.
    """
    listing = _listing(backbone)
    names = listing.names
    if layers is None:
        layers = [names[listing.reductions.index(stride)] for stride in strides if stride in listing.reductions]
    layers = list(layers)
    unknown = [layer for layer in layers if layer not in names]
    if unknown or len(layers) < 2:
        msg = f"Layers {layers} are not valid teacher levels of {backbone}; choose two or more of {list(names)}."
        raise ValueError(msg)
    return layers, [names.index(layer) for layer in layers], listing.wrapped


def level_channels(backbone: str, layers: Sequence[str]) -> list[int]:
    """Channels of the backbone's features at ``layers`` (read on the ``meta`` device)."""
    listing = _listing(backbone)
    return [listing.channels[listing.names.index(layer)] for layer in layers]


class Teacher(nn.Module):
    """Frozen timm CNN returning its features at ``layers`` (finest first), with frozen BatchNorm statistics.

    Args:
        backbone: Name of any timm CNN that supports ``features_only``.
        layers: Teacher levels (``None``: those at strides 8, 16 and 32).
        pre_trained: Load ImageNet weights now (``False``: random weights; see :meth:`load_pretrained`).
    """

    def __init__(self, backbone: str, layers: Sequence[str] | None = None, pre_trained: bool = True) -> None:
        super().__init__()
        self.layers, indices, self._wrapped = select_layers(backbone, layers)
        self.backbone = backbone
        # A wrapped model gets its weights before it is wrapped: let timm build it with them.
        self.feature_extractor = _create(backbone, pretrained=pre_trained and self._wrapped, out_indices=indices)
        if pre_trained and not self._wrapped:
            self._load_matching_keys()
        # Frozen BatchNorm normalizes with the ImageNet statistics in any mode, so the teacher needs no eval-mode
        # override (which Lightning would report as modules left in eval mode at the start of training).
        self.feature_extractor = freeze_batch_norm_2d(self.feature_extractor)
        self.requires_grad_(False)
        # NHWC: oneDNN's convolutions (depthwise ones above all) run about 1.5x faster on a CPU in this layout.
        self.to(memory_format=torch.channels_last)
        info = self.feature_extractor.feature_info
        self.out_dims: list[int] = info.channels()
        self.reductions: list[int] = info.reduction()

    def _load_matching_keys(self) -> None:
        own = set(self.feature_extractor.state_dict())
        load_pretrained(
            self.feature_extractor,
            pretrained_cfg=self.feature_extractor.pretrained_cfg,
            filter_fn=lambda state, _model: {key: value for key, value in state.items() if key in own},
        )

    def load_pretrained(self) -> None:
        """Load the backbone's ImageNet weights into the teacher (from timm's sources)."""
        if self._wrapped:
            indices = self.feature_extractor.feature_info.out_indices
            pretrained = _create(self.backbone, pretrained=True, out_indices=indices)
            self.feature_extractor.load_state_dict(pretrained.state_dict())
        else:
            self._load_matching_keys()

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.feature_extractor(images)
        return list(features.values()) if isinstance(features, dict) else list(features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Features at every level, finest first; on a CPU in calls of at most :data:`CPU_CHUNK_PIXELS` pixels."""
        images = images.contiguous(memory_format=torch.channels_last)
        if exporting() or images.device.type != "cpu":  # one call: a traced graph must not depend on the batch
            return self._features(images)
        chunk = images_per_call(*images.shape[-2:])
        if len(images) <= chunk:
            return self._features(images)
        parts = [self._features(part) for part in images.split(chunk)]
        return [torch.cat(level) for level in zip(*parts, strict=True)]
