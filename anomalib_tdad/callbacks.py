"""Lightning callbacks that ``Tdad`` returns from ``configure_callbacks``: data checks, seeded epochs, the refit of
the map statistics and the validation cadence."""

import hashlib
import itertools
import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.seed import isolate_rng
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_tdad.checks import check_datamodule, check_dataset_exists


class DataCheck(Callback):
    """Check every file of the splits a stage uses, so bad data fails at set-up, by name, not mid-run.

    A dataset folder that does not exist is named with what was found instead, also when anomalib's
    ``prepare_data`` has already tried to download it and failed (offline).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Run the checks of :mod:`anomalib_tdad.checks` on the trainer's datamodule."""
        del pl_module
        if trainer.datamodule is not None:
            check_dataset_exists(trainer.datamodule)
            check_datamodule(trainer.datamodule, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Replace a failed download of a dataset folder that does not exist by the clear error."""
        del pl_module, exception
        if trainer.datamodule is not None:
            check_dataset_exists(trainer.datamodule)


def _derive(*values: int) -> int:
    """A 63-bit seed that depends on every value (no two tuples share a stream)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededEpochs(Callback):
    """Seed torch's RNG at the start of every training epoch from the run's seed, the epoch and the rank.

    Each epoch's data order and synthetic anomalies are then a function of ``(seed, epoch, rank)`` alone:
    a run resumed or extended from a checkpoint saved at the end of an epoch continues exactly like an
    uninterrupted run, whatever validation or checkpointing drew from the RNG in between, and every
    process of a distributed run draws its own anomalies. The run's seed is ``torch.initial_seed()``
    at the start of fitting (``seed_everything``'s seed) and travels in the checkpoint.
    """

    def __init__(self) -> None:
        self.seed: int | None = None
        self.next_epoch = 0  # the epoch a run resumed from a checkpoint written now starts with
        self._seeded_epoch = -1

    def state_dict(self) -> dict[str, Any]:
        """The run's seed and the epoch a resumed run starts with."""
        return {"seed": self.seed, "next_epoch": self.next_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's run."""
        self.seed, self.next_epoch = state_dict["seed"], state_dict["next_epoch"]

    def _seed(self, trainer: pl.Trainer, epoch: int) -> None:
        torch.manual_seed(_derive(self.seed, epoch, trainer.global_rank))
        self._seeded_epoch = epoch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed the first epoch here: Lightning creates its data iterator before ``on_train_epoch_start``."""
        del pl_module
        if self.seed is None:
            self.seed = torch.initial_seed()
        self._seed(trainer, self.next_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed every later epoch, before its data iterator is created."""
        del pl_module
        if trainer.current_epoch != self._seeded_epoch:
            self._seed(trainer, trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: object, batch_idx: int
    ) -> None:
        """Once an epoch's last batch is trained, a resumed run starts with the next epoch."""
        del pl_module, outputs, batch
        done = batch_idx + 1 >= trainer.num_training_batches
        self.next_epoch = trainer.current_epoch + 1 if done else trainer.current_epoch


class MapStatistics(Callback):
    """Fit the map statistics of the current student on the training images before every validation, for every
    checkpoint written and after training (once per training step reached: a validation right after training, or a
    checkpoint right after a validation, does not refit again).

    The teacher features come from the model's teacher-feature cache when it holds every training image: when a
    whole training epoch in one process added no entry and none was left out for want of memory (so not after the
    first epoch, nor with augmentations that change the images every epoch; identical images count once). Such a
    refit loads, decodes and resizes no image and runs only the student. Otherwise it is a pass over the training
    images within the trainer's ``limit_train_batches``.
    """

    def __init__(self) -> None:
        self._fitted_step = -1  # global step at which the statistics were last fitted
        self._cache_version = -1  # the cache's version when the current training epoch began

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note the cache's state: an epoch that adds nothing to it has shown it every training image before."""
        del trainer
        self._cache_version = pl_module.model.teacher_cache.version

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score with the statistics of the student being validated."""
        self.fit(trainer, pl_module)

    def checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Give a checkpoint being written during fitting the statistics of its weights, also one written without a
        validation before it (an epoch the cadence skips, see :class:`ValidationCadence`, or a step checkpoint):
        only checkpoints that are written cost a refit. Not after an interruption or an error (the checkpoint keeps
        the last statistics). Called by the model's ``on_save_checkpoint``, which Lightning also calls for
        weights-only checkpoints (a callback's hook it skips for them)."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.interrupted or not self.fit(trainer, pl_module):
            return
        statistics = pl_module.model.anomaly_map_generator.statistics
        prefix = next(name for name, module in pl_module.named_modules() if module is statistics)
        checkpoint["state_dict"].update({f"{prefix}.{name}": value for name, value in statistics.state_dict().items()})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit the statistics of the final student (if no validation followed the last step)."""
        self.fit(trainer, pl_module)

    def fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Refit, unless the model does not standardize its maps, there are no training images or nothing trained
        since the last refit; True if it refitted."""
        model = pl_module.model
        if not model.anomaly_map_generator.standardize or trainer.train_dataloader is None:
            return False
        if self._fitted_step == trainer.global_step:
            return False
        reduce = partial(trainer.strategy.reduce, reduce_op="sum") if trainer.world_size > 1 else None
        with isolate_rng():  # a pass over the images (a shuffled loader) must not move the training's random stream
            model.fit_statistics(self._cached_features(trainer, model) or self._images(trainer, pl_module), reduce)
        self._fitted_step = trainer.global_step
        return True

    def _cached_features(self, trainer: pl.Trainer, model: torch.nn.Module) -> Iterator[list[torch.Tensor]] | None:
        """The training images' teacher features from the cache when it holds all of them, else None."""
        cache = model.teacher_cache
        limit = trainer.limit_train_batches  # the float 1.0 is every batch; the int 1 is one batch
        whole = isinstance(limit, float) and limit == 1.0 and trainer.world_size == 1 and not cache.full
        if not whole or not len(cache) or cache.version != self._cache_version:
            return None
        return cache.batches(getattr(trainer.train_dataloader, "batch_size", None) or 1)

    @staticmethod
    def _images(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[torch.Tensor]:
        """The pre-processed training images, within the trainer's ``limit_train_batches``."""
        limit = trainer.num_training_batches
        batches = trainer.train_dataloader
        transform = pl_module.pre_processor.transform if pl_module.pre_processor else None
        for batch in batches if math.isinf(limit) else itertools.islice(batches, int(limit)):
            images = batch.image.to(pl_module.device)
            yield transform(images) if transform else images


class ValidationCadence(Callback):
    """A validation cadence (``check_val_every_n_epoch``) that only skips validations: the last epoch validates
    and every epoch is checkpointed.

    With ``check_val_every_n_epoch=10`` and ``max_epochs=15`` Lightning validates after epoch 10 only, and the
    post-processor's thresholds and normalization (fitted in validation) and the checkpoint saved after
    validation would come from an older model than the one tested; and its checkpoint is written after
    validations only. Runs limited by steps or time only (no ``max_epochs``) keep the cadence as it is.
    """

    def __init__(self) -> None:
        self.every_n_epochs: int | None = None  # the trainer's cadence at the start of fitting

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the trainer's cadence."""
        del pl_module
        self.every_n_epochs = trainer.check_val_every_n_epoch

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A validation during fitting: its epoch's checkpoint, too, is written at the epoch's end (see below)."""
        del pl_module
        if trainer.state.fn == TrainerFn.FITTING:
            self._checkpoint_at_epoch_end(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Have the checkpoint written at this epoch's end, also when the cadence skipped its validation."""
        del pl_module
        self._checkpoint_at_epoch_end(trainer)

    def _checkpoint_at_epoch_end(self, trainer: pl.Trainer) -> None:
        """Make the trainer's cadence read 1 until the next epoch starts.

        Lightning's (and anomalib's) ``ModelCheckpoint``, which runs after this callback, saves at an epoch's end
        when validation runs every epoch, and otherwise after each validation only: a killed run would have nothing
        to resume from since the last validation, and a checkpoint written after validation, before its epoch
        ended, resumes as an unfinished epoch whose seeding differs from the uninterrupted run's. Checkpoints that
        monitor a metric are left alone.
        """
        if self.every_n_epochs in (None, 1) or trainer.max_epochs in (None, -1):
            return
        if all(getattr(callback, "monitor", None) is None for callback in trainer.checkpoint_callbacks):
            trainer.check_val_every_n_epoch = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the cadence of the first epoch: a run resumed in the middle of an epoch does not start it again."""
        del pl_module
        self._epoch_cadence(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the cadence of every epoch."""
        del pl_module
        self._epoch_cadence(trainer)

    def _epoch_cadence(self, trainer: pl.Trainer) -> None:
        """Validate every epoch from the last epoch on (Lightning reads the cadence after every batch)."""
        if self.every_n_epochs is None or trainer.max_epochs in (None, -1):
            return
        final = trainer.current_epoch + 1 >= trainer.max_epochs
        trainer.check_val_every_n_epoch = 1 if final else self.every_n_epochs

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the trainer its cadence back (anomalib's Engine reuses the trainer for a next fit)."""
        del pl_module
        self._restore(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the trainer its cadence back."""
        del pl_module, exception
        self._restore(trainer)

    def _restore(self, trainer: pl.Trainer) -> None:
        if self.every_n_epochs is not None:
            trainer.check_val_every_n_epoch = self.every_n_epochs
