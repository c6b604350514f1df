"""Shared fixtures and helpers: tiny MVTec-layout datasets made on the fly, quiet in-process training, one
briefly trained TDAD for the tests that need a trained model, and the installed commands run as subprocesses.
"""

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_tdad import Tdad
from anomalib_tdad.demo import DemoSplit, make_demo_dataset


def console_script(name: str) -> str:
    """The command ``name`` installed next to this interpreter (in the virtual environment), else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


ANOMALIB = console_script("anomalib")
SIZE = 64  # model input in pixels: small for speed, above the default backbone's minimum of 33


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny MVTec-layout dataset, category ``brick``: 16 train, 4 good + 6 defective test, 64 px."""
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root, "brick", split=DemoSplit(train=16, test_good=4, test_per_defect=2), image_size=64)
    return root


def mvtec_args(root: Path, dataset: str = "MVTecAD") -> list[str]:
    """CLI arguments selecting category ``brick`` of the tiny dataset at ``root`` through anomalib's ``dataset``."""
    return ["--data", dataset, "--data.root", str(root), "--data.category", "brick"]


# ---------------------------------------------------------------------------------------------- in-process runs


def tiny_model(size: int | tuple[int, int] = SIZE, **kwargs) -> Tdad:
    """A default Tdad (pre-trained Lite0 teacher, offline) whose pre-processor resizes to ``size`` px."""
    size = (size, size) if isinstance(size, int) else size
    return Tdad(pre_processor=Tdad.configure_pre_processor(image_size=size), **kwargs)


def tiny_datamodule(root: Path, category: str = "brick", batch_size: int = 4) -> MVTecAD:
    """anomalib's MVTecAD datamodule on ``root/category``, in-process loading (no workers)."""
    return MVTecAD(root=root, category=category, train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0)


def quiet_engine(path: Path, **kwargs) -> Engine:
    """anomalib's Engine writing under ``path``, without logger, progress bar or model summary; 1 epoch unless set."""
    kwargs.setdefault("max_epochs", 1)
    return Engine(default_root_dir=path, logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch on ``count`` CPU threads inside the block, the previous count restored after it.

    Training results depend (in the last digits) on the thread count: runs compared bit for bit share one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Trained:
    """A TDAD fitted by anomalib's Engine, with its data and checkpoint."""

    model: Tdad
    engine: Engine
    datamodule: MVTecAD
    root: Path
    checkpoint: Path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """TDAD trained 3 epochs at 128 px on 24 normal brick images (64 px, upsampled); tested on 4 good + 12 defective
    ones (read-only).

    Enough training for its maps to find most planted defects (``test_learning``), so tests of trained-model
    behaviour (exports, checkpoints) share it instead of training their own. At 64 px the default levels' stride-32
    map is 2 x 2 and misses a third of the small planted defects; at 128 px it is 4 x 4.
    """
    root = tmp_path_factory.mktemp("trained")
    make_demo_dataset(root / "data", "brick", split=DemoSplit(train=24, test_good=4, test_per_defect=4), image_size=64)
    seed_everything(0)
    model, datamodule = tiny_model(2 * SIZE), tiny_datamodule(root / "data", batch_size=8)
    engine = quiet_engine(root / "results", max_epochs=3)
    engine.fit(model=model, datamodule=datamodule)
    return Trained(model, engine, datamodule, root / "data", Path(engine.best_model_path))


# ---------------------------------------------------------------------------------------------- subprocesses


def run_command(
    *command: str, cwd: Path, check: bool = True, timeout: int = 600, threads: int | None = None
) -> subprocess.CompletedProcess:
    """Run ``command`` quietly (no Python warnings, a wide terminal so error boxes do not wrap).

    With ``check``, fail the test with the command's output if it exits non-zero; otherwise the caller checks.
    ``threads`` caps the command's OpenMP threads.
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def run_anomalib(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed ``anomalib`` command (see :func:`run_command` for the options)."""
    return run_command(ANOMALIB, *args, cwd=cwd, **kwargs)


def export_cli(checkpoint: Path, export_type: str, root: Path) -> Path:
    """``anomalib export`` of a TDAD checkpoint as ``export_type`` (torch, onnx, openvino) to ``root``; returns root."""
    args = ["--model", "Tdad", "--export_type", export_type, "--ckpt_path", str(checkpoint), "--export_root", str(root)]
    run_anomalib("export", *args, cwd=root.parent)
    return root
