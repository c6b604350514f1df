"""Faults during training: non-finite losses, a killed job resumed from its checkpoint, reproducible seeds."""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import quiet_engine, tiny_datamodule, tiny_model, torch_threads
from lightning.pytorch import Callback, seed_everything

from anomalib_tdad import Tdad
from anomalib_tdad.models.tdad.lightning_model import NonFiniteLossError


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def raw_scores(model: Tdad, root: Path) -> torch.Tensor:
    """Un-normalized image scores of the test images (the model's own output, before post-processing)."""
    from anomalib.data.datasets import MVTecADDataset

    dataset = MVTecADDataset(root=root, category="brick", split="test")
    images = torch.stack([dataset[i].image for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        return model.model(model.pre_processor.transform(images)).pred_score


# ---------------------------------------------------------------------------------------------- non-finite loss


@pytest.mark.parametrize(("term", "value"), [("gkd", float("nan")), ("scd", float("inf")), ("dmd", float("nan"))])
def test_non_finite_loss_term_stops_training_naming_term_and_step(
    tiny_root: Path, tmp_path: Path, term: str, value: float
) -> None:
    seed_everything(0)
    model = tiny_model()
    loss = model.loss.forward
    calls = []

    def failing_at_third_step(*args, **kwargs):
        total, terms = loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            terms[term] = terms[term] * value
        return total, terms

    model.loss.forward = failing_at_third_step
    engine = quiet_engine(tmp_path, max_epochs=2)
    expected = rf"TDAD's {term.upper()} loss became {value} at global step 2 \(epoch 0\)"
    with pytest.raises(NonFiniteLossError, match=expected):
        engine.fit(model, datamodule=tiny_datamodule(tiny_root))
    assert len(calls) == 3  # stopped at once
    assert not list(tmp_path.rglob("*.ckpt"))  # and no checkpoint holds the broken model


def test_non_finite_weights_are_never_checkpointed(tiny_root: Path, tmp_path: Path) -> None:
    """Weights that turn NaN in an epoch's last step (its loss still finite) are caught when the checkpoint is saved."""

    class PoisonLastStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 3:
                with torch.no_grad():
                    pl_module.model.student.decoder.heads[0].weight.fill_(float("nan"))

    seed_everything(0)
    engine = quiet_engine(tmp_path, max_epochs=1, callbacks=[PoisonLastStep()])
    match = r"weights became non-finite \(model\.student\.decoder\.heads\.0\.weight.* the checkpoint was not written"
    with pytest.raises(NonFiniteLossError, match=match):
        engine.fit(tiny_model(), datamodule=tiny_datamodule(tiny_root))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_training_without_validation_still_checkpoints(tiny_root: Path, tmp_path: Path) -> None:
    """No validation pass leaves the post-processor's thresholds NaN; that is not a broken model."""
    seed_everything(0)
    engine = quiet_engine(tmp_path, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    engine.fit(tiny_model(), datamodule=tiny_datamodule(tiny_root))
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.isnan(state["post_processor._image_threshold"]).all()  # unfitted, as anomalib leaves it
    assert all(
        torch.isfinite(value).all()
        for name, value in state.items()
        if name.startswith("model.") and value.is_floating_point()
    )


# ---------------------------------------------------------------------------------------------- kill and resume

TRAIN_SCRIPT = r'''
import json, os, signal, sys
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.data.datasets import MVTecADDataset
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from anomalib_tdad import Tdad

torch.set_num_threads(1)
root, out, kill_epoch, ckpt_path = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None
cadence = int(sys.argv[5])


class KillAtSecondStep(Callback):
    """SIGKILL the process -- no clean-up, no exception handler -- in the middle of epoch ``kill_epoch``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == kill_epoch and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)


class Epochs(Callback):
    def __init__(self):
        self.started = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.started.append(trainer.current_epoch)


seed_everything(0)  # the same command line as the first run, plus the checkpoint
epochs = Epochs()
model = Tdad(pre_processor=Tdad.configure_pre_processor(image_size=(64, 64)), check_val_every_n_epoch=cadence)
datamodule = MVTecAD(root=root, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0)
engine = Engine(max_epochs=3, default_root_dir=out, logger=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[KillAtSecondStep(), epochs])
engine.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

dataset = MVTecADDataset(root=root, category="brick", split="test")
images = torch.stack([dataset[i].image for i in range(len(dataset))])
model.eval()
with torch.no_grad():
    scores = model.model(model.pre_processor.transform(images)).pred_score.tolist()
torch.save(model.state_dict(), out / "final_state.pt")
(out / "result.json").write_text(json.dumps({"epochs": epochs.started, "global_step": engine.trainer.global_step,
                                             "scores": scores}))
'''


def run_training(
    tmp_path: Path, root: Path, name: str, kill_epoch: int = -1, ckpt_path: Path | None = None, cadence: int = 1
):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    out = tmp_path / name
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(script), str(root), str(out), str(kill_epoch), str(ckpt_path or ""), str(cadence)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    return out, result


@pytest.mark.parametrize("cadence", [1, 2, 3])
def test_killed_training_resumes_from_last_checkpoint_like_an_uninterrupted_run(
    tiny_root: Path, tmp_path: Path, cadence: int
) -> None:
    """Killed in its third epoch, a run resumes from the end of the second: validated every epoch (cadence 1), validated
    at a cadence of 2, or not validated (3)."""
    full, result = run_training(tmp_path, tiny_root, "uninterrupted", cadence=cadence)
    assert result.returncode == 0, result.stderr[-5000:]

    killed, result = run_training(tmp_path, tiny_root, "killed", kill_epoch=2, cadence=cadence)
    assert result.returncode == -signal.SIGKILL
    assert not (killed / "result.json").exists()
    (checkpoint,) = killed.rglob("*.ckpt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 8)  # epochs 0 and 1 finished, 4 steps each
    # Its map statistics were fitted for its weights, also without a validation (identity: mean 0, std 1).
    assert not torch.all(saved["state_dict"]["model.anomaly_map_generator.statistics.levels.0.std"] == 1)

    resumed, result = run_training(tmp_path, tiny_root, "resumed", ckpt_path=checkpoint, cadence=cadence)
    assert result.returncode == 0, result.stderr[-5000:]
    full_result = json.loads((full / "result.json").read_text())
    resumed_result = json.loads((resumed / "result.json").read_text())
    assert resumed_result["epochs"] == [2]  # finished epochs are not trained again
    assert resumed_result["global_step"] == full_result["global_step"] == 12
    # Each epoch is seeded from the run's seed and its number, so the resumed run draws the same anomalies, and the
    # teacher features it computes afresh are those the uninterrupted run cached: the model is the same, bit for bit.
    # (Both runs use the same machine, threads and batch shapes, so oneDNN picks the same kernels; a resumed run on
    # another CPU could differ in the last bits.)
    assert resumed_result["scores"] == full_result["scores"]
    full_state = torch.load(full / "final_state.pt", weights_only=True)
    resumed_state = torch.load(resumed / "final_state.pt", weights_only=True)
    for name, value in full_state.items():
        assert torch.equal(resumed_state[name], value), name


# anomalib's Engine writes every run to a new version folder, so Lightning notes that the resumed run's checkpoint
# folder differs from the first run's (its ModelCheckpoint then keeps only best_model_path): Lightning's message
# about any resumed anomalib run, not one of ours.
@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
def test_a_finished_run_extended_from_its_checkpoint_ends_like_an_uninterrupted_run(
    tiny_root: Path, tmp_path: Path
) -> None:
    """One epoch, then the same command with two epochs and the checkpoint: the two-epoch run's weights."""

    def fit(epochs: int, name: str, ckpt_path: Path | None = None) -> Tdad:
        seed_everything(7)
        model = tiny_model()
        quiet_engine(tmp_path / name, max_epochs=epochs).fit(
            model, datamodule=tiny_datamodule(tiny_root), ckpt_path=ckpt_path
        )
        return model

    uninterrupted = fit(2, "uninterrupted")
    fit(1, "first")
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    extended = fit(2, "extended", checkpoint)
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(extended.model.state_dict()[name], value, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- seeds


def test_same_seed_gives_same_scores(tiny_root: Path, tmp_path: Path) -> None:
    def train_and_predict(seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        seed_everything(seed)
        model, datamodule = tiny_model(), tiny_datamodule(tiny_root)
        engine = quiet_engine(tmp_path / name, max_epochs=1)
        engine.fit(model, datamodule=datamodule)
        normalized = torch.cat([batch.pred_score for batch in engine.predict(model, datamodule=datamodule)])
        return raw_scores(model, tiny_root), normalized

    raw_first, normalized_first = train_and_predict(7, "first")
    raw_again, normalized_again = train_and_predict(7, "again")
    raw_other, _ = train_and_predict(8, "other")
    assert torch.equal(raw_first, raw_again)
    assert torch.equal(normalized_first, normalized_again)
    assert not torch.allclose(raw_first, raw_other)  # the seed does matter, so the equality above means something
