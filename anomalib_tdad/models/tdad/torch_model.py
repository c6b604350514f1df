"""PyTorch model of TDAD: frozen timm teacher, reverse-distillation student, anomaly map."""

from collections.abc import Sequence

import timm
import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn

from anomalib_tdad.weights import check_pretrained_available

from .anomaly_map import AnomalyMapGenerator, image_score, level_distances
from .student import Student, embedding_stride


def available_layers(backbone: str) -> list[str]:
    """Names of the feature levels timm's ``features_only`` exposes for ``backbone``."""
    model = timm.create_model(backbone, pretrained=False, features_only=True, exportable=True)
    return [info["module"] for info in model.feature_info.info]


class TdadModel(nn.Module):
    """Teacher, student and anomaly map.

    In training mode ``forward`` returns the teacher and student features (finest level first);
    in eval mode an :class:`InferenceBatch` with the anomaly map and image score, using one
    teacher pass and one student pass.

    Args:
        backbone: Name of any timm CNN that supports ``features_only``.
        layers: Two or more teacher levels of increasing stride, e.g. ``("layer1", "layer2", "layer3")``.
        pre_trained: Load ImageNet weights for the teacher (fails fast if they cannot be had).
        embedding_dim: Channels of the student's bottleneck embedding (``None``: ``max(256, 2 * C_last)``).
        sigma: Gaussian smoothing of the anomaly map, in pixels.
        score_topk: Image score is the mean of this fraction of the highest map pixels (0: the maximum).
        standardize: Standardize each level's distance map with its per-position mean and standard deviation
            on the normal training images before summing the levels (see :class:`LevelStatistics`).
        level_weights: Weight of each level's map in the sum, finest first (``None``: all 1).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool = True,
        embedding_dim: int | None = None,
        sigma: float = 4.0,
        score_topk: float = 0.0,
        standardize: bool = True,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        layers = list(layers)
        if not timm.is_model(backbone):
            msg = f"Unknown timm backbone {backbone!r}. See timm.list_models() for the available names."
            raise ValueError(msg)
        known = available_layers(backbone)
        unknown = [layer for layer in layers if layer not in known]
        if unknown or len(layers) < 2:
            msg = f"Layers {layers} are not valid teacher levels of {backbone}; choose two or more of {known}."
            raise ValueError(msg)
        if not 0 <= score_topk < 1:
            msg = f"score_topk must lie in [0, 1), got {score_topk}."
            raise ValueError(msg)
        if pre_trained:
            check_pretrained_available(backbone)

        self.teacher = TimmFeatureExtractor(
            backbone=backbone, layers=layers, pre_trained=pre_trained, requires_grad=False
        )
        # ``requires_grad=False`` only wraps the teacher's forward in ``no_grad``; freeze its parameters too, or
        # DDP waits for gradients they never get ("parameters that were not used in producing the loss").
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.layers = layers
        reductions = self.teacher.feature_extractor.feature_info.reduction()
        if list(reductions) != sorted(reductions):
            msg = f"Layers {layers} of {backbone} must be ordered by increasing stride, got strides {reductions}."
            raise ValueError(msg)
        self.student = Student(self.teacher.out_dims, reductions, embedding_dim)
        self.anomaly_map_generator = AnomalyMapGenerator(
            levels=len(layers), sigma=sigma, standardize=standardize, level_weights=level_weights
        )
        self.score_topk = score_topk
        self.backbone = backbone
        # The student's embedding must be at least 2x2 (its BatchNorm fails on 1x1 maps when a batch holds
        # one image); the map's Gaussian blur pads by 4 sigma.
        self.min_input_size = max(embedding_stride(reductions) + 1, int(4.0 * sigma + 0.5) + 1)

    def train(self, mode: bool = True) -> "TdadModel":
        """Switch the student's mode; the teacher always stays in eval mode (frozen BatchNorm)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise a clear error for inputs smaller than the backbone's minimum (``min_input_size`` per side)."""
        height, width = (int(side) for side in size)
        if min(height, width) < self.min_input_size:
            msg = (
                f"Input of {height}x{width} px is too small for TDAD with backbone {self.backbone} at layers "
                f"{self.layers}: each side must be at least {self.min_input_size} px. Resize images to a larger size "
                f"in the pre-processor, e.g. Tdad(pre_processor=Tdad.configure_pre_processor(image_size=(256, 256)))."
            )
            raise ValueError(msg)

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen teacher features, finest level first."""
        return list(self.teacher(images).values())

    @torch.no_grad()
    def distance_moments(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-level sums and sums of squares over the batch of the ``(h, w)`` distance maps, in float64."""
        teacher = self.teacher_features(images)
        distances = [d.double() for d in level_distances(teacher, self.student(teacher))]
        return [d.sum(dim=(0, 1)) for d in distances], [(d**2).sum(dim=(0, 1)) for d in distances]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """Training: ``(teacher, student)`` features. Eval: anomaly map and score."""
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            self.check_input_size(images.shape[-2:])
        teacher = self.teacher_features(images)
        student = self.student(teacher)
        if self.training:
            return teacher, student
        anomaly_map = self.anomaly_map_generator(teacher, student, images.shape[-2:])
        return InferenceBatch(pred_score=image_score(anomaly_map, self.score_topk), anomaly_map=anomaly_map)
