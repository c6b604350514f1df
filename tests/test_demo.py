"""``anomalib-tdad demo`` (the README's first command, ``make demo``): dataset, training, metrics and heatmaps.

The demo has no size knobs (``run_demo`` makes 120 + 50 images at 256 px and trains ``Tdad()`` at 256 px,
minutes on a CPU), so the in-process run below shrinks the dataset and the model input by patching the two
names ``run_demo`` calls; the rest is the command as a user runs it.
"""

import contextlib
import functools
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, console_script, run_command, tiny_model
from PIL import Image

import anomalib_tdad
from anomalib_tdad import cli, demo
from anomalib_tdad.demo import DEFECTS, DemoSplit, make_demo_dataset

SPLIT = DemoSplit(train=8, test_good=3, test_per_defect=1)
EPOCHS = 2


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``anomalib-tdad demo --output <tmp> --epochs 2`` on 8 + 6 images at 64 px; returns (output, stdout)."""
    output = tmp_path_factory.mktemp("demo") / "results"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(demo, "make_demo_dataset", functools.partial(make_demo_dataset, split=SPLIT, image_size=SIZE))
        patch.setattr(anomalib_tdad, "Tdad", tiny_model)
        cli.main(["demo", "--output", str(output), "--epochs", str(EPOCHS)])
    return output, stdout.getvalue()


def test_demo_writes_its_dataset_in_mvtec_layout(demo_run: tuple[Path, str]) -> None:
    folder = demo_run[0] / "data" / "brick"
    assert len(list((folder / "train" / "good").glob("*.png"))) == SPLIT.train
    assert len(list((folder / "test" / "good").glob("*.png"))) == SPLIT.test_good
    for kind in DEFECTS:
        images = sorted(path.stem for path in (folder / "test" / kind).glob("*.png"))
        masks = sorted(path.stem.removesuffix("_mask") for path in (folder / "ground_truth" / kind).glob("*.png"))
        assert images == masks and len(images) == SPLIT.test_per_defect


def test_demo_metrics_are_written_printed_and_sane(demo_run: tuple[Path, str]) -> None:
    output, stdout = demo_run
    metrics = json.loads((output / "metrics.json").read_text())
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    for value in metrics.values():
        assert math.isfinite(value) and 0 <= value <= 1 and round(value, 4) == value
    printed = stdout[: stdout.rindex("}") + 1]  # the command prints the metrics, then where it wrote them
    assert json.loads(printed[printed.index("{") :]) == metrics
    assert f"Metrics: {output / 'metrics.json'}; heatmaps: {output / 'Tdad'}" in stdout


def test_demo_writes_one_heatmap_per_test_image(demo_run: tuple[Path, str]) -> None:
    """Under the folder the README names, with the test image's type and name; each a distinct heatmap picture."""
    output, _ = demo_run
    test_folder = output / "data" / "brick" / "test"
    test_images = sorted(path.relative_to(test_folder) for path in test_folder.glob("*/*.png"))
    heatmaps_folder = output / "Tdad" / "MVTecAD" / "brick" / "latest" / "images"
    heatmaps = sorted(path.relative_to(heatmaps_folder) for path in heatmaps_folder.rglob("*.png"))
    assert heatmaps == test_images
    pictures = [np.asarray(Image.open(heatmaps_folder / path).convert("RGB")).astype(int) for path in heatmaps]
    assert all(picture.shape[0] >= SIZE and picture.shape[1] >= SIZE for picture in pictures)
    assert len({picture.tobytes() for picture in pictures}) == len(pictures)
    for picture in pictures:  # the test images are grey: colour is the anomaly map drawn over them
        colourful = (picture.max(axis=-1) - picture.min(axis=-1)) > 50
        assert colourful.mean() > 0.05


def test_demo_trains_the_epochs_asked_for_and_keeps_the_checkpoint(demo_run: tuple[Path, str]) -> None:
    output, _ = demo_run
    checkpoint = output / "Tdad" / "MVTecAD" / "brick" / "latest" / "weights" / "lightning" / "model.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["epoch"] + 1 == EPOCHS


def test_console_script_offers_the_demo_and_its_options(tmp_path: Path) -> None:
    """The ``anomalib-tdad`` command ``make demo`` runs is installed and takes the README's options."""
    result = run_command(console_script("anomalib-tdad"), "demo", "--help", cwd=tmp_path)
    for option in ("--output", "--epochs", "--texture", "--seed"):
        assert option in result.stdout
