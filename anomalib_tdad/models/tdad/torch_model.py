"""PyTorch model of TDAD: frozen timm teacher, reverse-distillation student, anomaly map."""

from collections.abc import Callable, Iterable, Sequence

import timm
import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_tdad.weights import check_pretrained_available, pretrained_weights_cached

from .anomaly_map import AnomalyMapGenerator, image_score, level_distances
from .feature_cache import FeatureCache
from .student import Student, embedding_stride
from .teacher import Teacher
from .utils import exporting, native_bf16_cpu

# Sums a tensor over the processes of a distributed run (e.g. Lightning's ``strategy.reduce``).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _teacher_loaded(model: "TdadModel", incompatible: nn.modules.module._IncompatibleKeys) -> None:
    """A state dict that holds the teacher's weights (a checkpoint) makes downloading them unnecessary."""
    model.teacher_cache.clear()
    if not any(".feature_extractor." in key for key in incompatible.missing_keys):
        model.weights_pending = False


class TdadModel(nn.Module):
    """Teacher, student and anomaly map.

    In training mode ``forward`` returns the teacher and student features (finest level first);
    in eval mode an :class:`InferenceBatch` with the anomaly map and image score, using one
    teacher pass and one student pass.

    Args:
        backbone: Name of any timm CNN that supports ``features_only``.
        layers: Two or more teacher levels of increasing stride, e.g. ``("layer1", "layer2", "layer3")``
            (``None``: the backbone's levels at strides 8, 16 and 32).
        pre_trained: ImageNet weights for the teacher. Weights already on disk load at once; weights that
            must be downloaded load in :meth:`load_pending_weights` (at the start of training), so that
            loading a checkpoint, which holds them, never waits for the network.
        embedding_dim: Channels of the student's bottleneck embedding (``None``: twice those of the coarsest
            level below stride 32, at least 256; see :func:`~.student.default_embedding_dim`).
        sigma: Gaussian smoothing of the anomaly map, in pixels.
        score_topk: Image score is the mean of this fraction of the highest map pixels (0: the maximum).
        standardize: Standardize each level's distance map with its per-position mean and standard deviation
            on the normal training images before summing the levels (see :class:`LevelStatistics`).
        level_weights: Weight of each level's map in the sum, finest first (``None``: all 1).
        teacher_cache_mb: Memory for the teacher features of normal training images, reused in later epochs and
            statistics passes on a CPU (see :class:`FeatureCache`; 0 switches it off).
        bf16_student: Run the student's training forward pass (and so its backward pass) under bfloat16 autocast;
            its outputs, the losses, the map statistics and inference stay float32 (``None``: on a CPU that
            computes in bf16 natively, see :func:`~.utils.native_bf16_cpu`; ``True`` on a GPU needs bf16 there).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        embedding_dim: int | None = None,
        sigma: float = 4.0,
        score_topk: float = 0.0,
        standardize: bool = True,
        level_weights: Sequence[float] | None = None,
        teacher_cache_mb: int = 1024,
        bf16_student: bool | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(backbone):
            msg = f"Unknown timm backbone {backbone!r}. See timm.list_models() for the available names."
            raise ValueError(msg)
        if not 0 <= score_topk < 1:
            msg = f"score_topk must lie in [0, 1), got {score_topk}."
            raise ValueError(msg)
        cached = pre_trained and pretrained_weights_cached(backbone)
        self.teacher = Teacher(backbone, layers, pre_trained=cached)
        self.teacher_cache = FeatureCache(teacher_cache_mb * 2**20)
        self.weights_pending = pre_trained and not cached
        self.register_load_state_dict_post_hook(_teacher_loaded)
        self.layers = self.teacher.layers
        reductions = self.teacher.reductions
        if list(reductions) != sorted(reductions):
            msg = f"Layers {self.layers} of {backbone} must be ordered by increasing stride, got strides {reductions}."
            raise ValueError(msg)
        self.student = Student(self.teacher.out_dims, reductions, embedding_dim)
        self.anomaly_map_generator = AnomalyMapGenerator(
            levels=len(self.layers), sigma=sigma, standardize=standardize, level_weights=level_weights
        )
        self.score_topk = score_topk
        self.bf16_student = bf16_student
        self.backbone = backbone
        # The student's embedding must be at least 2x2 (its BatchNorm fails on 1x1 maps when a batch holds
        # one image); the map's Gaussian blur pads by 4 sigma.
        self.min_input_size = max(embedding_stride(reductions) + 1, int(4.0 * sigma + 0.5) + 1)

    def load_pending_weights(self) -> None:
        """Load the teacher's ImageNet weights if they were left to download (fails fast when offline)."""
        if self.weights_pending:
            check_pretrained_available(self.backbone)
            self.teacher.load_pretrained()
            self.teacher_cache.clear()
            self.weights_pending = False

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

    def student_in_bf16(self, device: torch.device) -> bool:
        """Whether the student's training pass on ``device`` runs under bfloat16 autocast (``bf16_student``)."""
        return self.bf16_student if self.bf16_student is not None else device.type == "cpu" and native_bf16_cpu()

    @torch.no_grad()
    def fit_statistics(
        self, batches: Iterable[torch.Tensor] | Iterable[list[torch.Tensor]], reduce: Reduce | None = None
    ) -> None:
        """Fit the per-level map statistics on batches of normal, normalized images (one eval pass), or on
        batches of their teacher features (lists of levels, finest first, e.g. ``teacher_cache.batches``).

        ``reduce`` adds up the sums of the processes of a distributed run.
        """
        training = self.training
        self.eval()
        sums: list[torch.Tensor] = []
        squares: list[torch.Tensor] = []
        count = torch.zeros((), dtype=torch.float64)
        try:
            for batch in batches:
                teacher = batch if isinstance(batch, list) else self.teacher_cache(self.teacher, batch)
                distances = [d.double() for d in level_distances(teacher, self.student(teacher))]
                batch_sums = [d.sum(dim=(0, 1)) for d in distances]
                batch_squares = [(d**2).sum(dim=(0, 1)) for d in distances]
                sums = [a + b for a, b in zip(sums, batch_sums, strict=True)] if sums else batch_sums
                squares = [a + b for a, b in zip(squares, batch_squares, strict=True)] if squares else batch_squares
                count = count.to(teacher[0].device) + teacher[0].shape[0]
        finally:
            self.train(training)
        if reduce is not None:
            sums, squares, count = [reduce(s) for s in sums], [reduce(s) for s in squares], reduce(count)
        self.anomaly_map_generator.statistics.fit(sums, squares, int(count.item()))

    def forward(
        self, images: torch.Tensor, corrupted: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """Training: ``(teacher, student)`` features of ``images`` and then ``corrupted``. Eval: map and score.

        In training ``images`` are normal training images (their teacher features are cached) and
        ``corrupted`` their synthetic anomalies, if any.
        """
        if not exporting():
            self.check_input_size(images.shape[-2:])
        if self.weights_pending:
            msg = (
                f"The teacher's ImageNet weights ({self.backbone}) are not loaded yet: train the model (they load "
                "at the start of training) or load a checkpoint, or call load_pending_weights()."
            )
            raise RuntimeError(msg)
        if self.training:
            if corrupted is not None and not self.teacher_cache.active(images):  # one teacher pass for both views
                teacher = self.teacher(torch.cat([images, corrupted]))
            elif corrupted is not None:
                clean, changed = (
                    self.teacher_cache(self.teacher, images),
                    self.teacher_cache(self.teacher, corrupted, False),
                )
                teacher = [torch.cat(pair) for pair in zip(clean, changed, strict=True)]
            else:
                teacher = self.teacher_cache(self.teacher, images)
            if not self.student_in_bf16(images.device):  # an outer autocast (``precision="bf16-mixed"``) stays
                return teacher, self.student(teacher)
            with torch.autocast(images.device.type, dtype=torch.bfloat16):
                student = self.student(teacher)
            return teacher, [level.float() for level in student]  # the losses compare in float32
        teacher = self.teacher(images)
        student = self.student(teacher)
        anomaly_map = self.anomaly_map_generator(teacher, student, images.shape[-2:])
        return InferenceBatch(pred_score=image_score(anomaly_map, self.score_topk), anomaly_map=anomaly_map)
