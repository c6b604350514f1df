"""Shared fixtures: tiny MVTec-layout datasets made on the fly, and the installed ``anomalib`` command."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_tdad.demo import DemoSplit, make_demo_dataset

ANOMALIB = shutil.which("anomalib", path=str(Path(sys.executable).parent)) or "anomalib"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny MVTec-layout dataset, category ``brick``: 16 train, 4 good + 6 defective test, 64 px."""
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root, "brick", split=DemoSplit(train=16, test_good=4, test_per_defect=2), image_size=64)
    return root


def mvtec_args(root: Path, dataset: str = "MVTecAD") -> list[str]:
    """CLI arguments selecting category ``brick`` of the tiny dataset at ``root`` through anomalib's ``dataset``."""
    return ["--data", dataset, "--data.root", str(root), "--data.category", "brick"]


def run_anomalib(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``anomalib`` command; fail the test with its output if it exits non-zero."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [ANOMALIB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"anomalib {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result
