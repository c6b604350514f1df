"""Smoke runs of the benchmark scripts in ``benchmarks/``: the tiny generated dataset, one epoch, one seed.

They check that each script runs end to end and writes its CSV, Markdown and PNG files with one row per
model and finite metrics; the numbers themselves mean nothing at this size. The benchmark configs are
checked without training.
"""

import importlib
import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from anomalib.data import ImageBatch
from anomalib.metrics import AUROC
from anomalib.post_processing import PostProcessor
from conftest import run_command
from sklearn.metrics import roc_auc_score

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MODEL_LABELS = ["TDAD", "RD (TDAD λs=λd=0, same teacher)", "PatchCore", "STFPM", "PaDiM"]
ABLATION_LABELS = ["GKD", "GKD+SCD", "GKD+DMD", "GKD+SCD+DMD"]
METRICS = ["image AUROC", "pixel AUROC", "PRO"]
TYPE_PREFIX = "pixel AUROC · "
TINY = ["--category", "brick", "--image-size", "64", "--batch-size", "4", "--seeds", "0", "--max-epochs", "1"]
MVTEC_CATEGORIES = {
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
}  # fmt: skip


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` with this interpreter (one thread unless OMP_NUM_THREADS says otherwise)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    return run_command(sys.executable, str(BENCHMARKS / script), *args, cwd=cwd, threads=threads)


@pytest.fixture(scope="module")
def common() -> Iterator[ModuleType]:
    """``benchmarks/common.py``, imported by name as the scripts import it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("common")


def assert_scores(frame: pd.DataFrame, columns: list[str]) -> None:
    """Every value of ``columns`` is a finite number in [0, 1]."""
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        assert values.between(0, 1).all(), f"{column}: {values.tolist()}"


def assert_png(path: Path) -> None:
    """``path`` is a PNG image."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def assert_report(path: Path, labels: list[str]) -> None:
    """The Markdown report names every label and says how it was made."""
    text = path.read_text(encoding="utf-8")
    for needle in [*labels, "Command:", "Git commit:", "Device:", "torch threads"]:
        assert needle in text, needle


def test_compare_writes_one_row_per_model(tiny_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "compare"
    args = ["--root", str(tiny_root), *TINY, "--coreset-ratio", "0.05", "--heatmaps", "2", "--output", str(output)]
    run_script("compare.py", *args, cwd=tmp_path)
    results = pd.read_csv(output / "results.csv")
    assert results.model.tolist() == MODEL_LABELS
    assert results.error.isna().all()
    assert_scores(results, METRICS)
    defect_types = sorted(path.name for path in (tiny_root / "brick" / "test").iterdir() if path.name != "good")
    by_type = [column.removeprefix(TYPE_PREFIX) for column in results.columns if column.startswith(TYPE_PREFIX)]
    assert by_type == defect_types
    assert_scores(results, [TYPE_PREFIX + kind for kind in defect_types])
    assert pd.read_csv(output / "summary.csv").model.tolist() == MODEL_LABELS
    assert_report(output / "report.md", [*MODEL_LABELS, *METRICS, *defect_types, "by defect type", "heatmaps.png"])
    assert_png(output / "metrics.png")
    assert_png(output / "heatmaps.png")


def test_pixel_auroc_by_type_scores_each_defect_type_against_the_good_images(common: ModuleType) -> None:
    def batch(kind: str, inside: float) -> tuple[SimpleNamespace, SimpleNamespace]:
        masks = torch.zeros(2, 16, 16, dtype=torch.bool)
        maps = torch.full((2, 1, 16, 16), 100.0)  # raw values far outside [0, 1], as PaDiM's are
        if kind != "good":
            masks[:, 4:8, 4:8] = True
            maps[:, 0, 4:8, 4:8] = inside
        paths = [f"root/test/{kind}/{index}.png" for index in range(2)]
        return SimpleNamespace(anomaly_map=maps, gt_mask=masks), SimpleNamespace(image_path=paths)

    collector = common._TestMapCollector()  # noqa: SLF001
    for kind, inside in [("good", 0.0), ("found", 1000.0), ("missed", 0.0), ("good", 0.0)]:
        outputs, images = batch(kind, inside)
        collector.on_test_batch_end(None, None, outputs, images, 0)
    scores = collector.pixel_auroc_by_type()
    assert scores == pytest.approx({f"{TYPE_PREFIX}found": 1.0, f"{TYPE_PREFIX}missed": 0.0})
    assert common.TYPE_PREFIX == TYPE_PREFIX


def raw_outputs() -> ImageBatch:
    """12 images' raw scores and 4x4 maps far outside [0, 1] (as PaDiM's are), with ties across the labels.

    Image scores tie at the value F1 picks as threshold (130); the highest and lowest lie more than half the
    range from it, where anomalib's default post-processor clamps them to 1 or 0, tying both labels. Likewise,
    the pixel threshold is a defect's 4200; a normal pixel ties with it and the rest of the map lies far below.
    """
    scores = torch.tensor([-2000.0, -1900, -1800, 120, 130, 130, 130, 135, 2900, 2990, 3000, 140])
    labels = torch.tensor([0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0])
    count = len(scores)
    maps = ((torch.arange(count * 16) % 7) * 50.0 - 100).view(count, 1, 4, 4)  # -100 ... 200, in both labels
    masks = torch.zeros(count, 4, 4, dtype=torch.bool)
    masks[labels.bool(), 1:3, 1:3] = True
    maps[:, 0][masks] = torch.tensor([150.0, 200, 4200, 4300]).repeat(int(labels.sum()))
    maps[0, 0, 0, :3] = torch.tensor([4000.0, 4100, 4200])  # normal pixels in the far tail, one at the threshold
    maps[0, 0, 3, 3] = -3000.0
    return ImageBatch(
        image=torch.zeros(count, 3, 4, 4), pred_score=scores, gt_label=labels, anomaly_map=maps, gt_mask=masks
    )


def post_processed(post_processor: PostProcessor) -> tuple[ImageBatch, float, float]:
    """Fit ``post_processor`` on the raw outputs as validation set and post-process them as test set, as the
    benchmarks do; return the batch and anomalib's image and pixel AUROC of it (the benchmarks' metrics)."""
    post_processor.on_validation_batch_end(None, None, raw_outputs())
    post_processor.on_validation_epoch_end(None, None)
    batch = raw_outputs()
    post_processor.post_process_batch(batch)
    image, pixel = AUROC(fields=["pred_score", "gt_label"]), AUROC(fields=["anomaly_map", "gt_mask"])
    image.update(batch)
    pixel.update(batch)
    return batch, image.compute().item(), pixel.compute().item()


def test_min_max_post_processor_keeps_the_auroc_of_the_raw_scores(common: ModuleType) -> None:
    """The benchmarks' AUROC (anomalib's, on post-processed outputs) is the raw scores' (scikit-learn's).

    anomalib's default post-processor, which clamps around the threshold, changes it on these outputs: that is
    why every benchmark model gets ``MinMaxPostProcessor``.
    """
    raw = raw_outputs()
    raw_image = roc_auc_score(raw.gt_label.numpy(), raw.pred_score.numpy())
    raw_pixel = roc_auc_score(raw.gt_mask.flatten().numpy(), raw.anomaly_map.flatten().numpy())
    post_processor = common.MinMaxPostProcessor()
    batch, image, pixel = post_processed(post_processor)
    assert (image, pixel) == (pytest.approx(raw_image, abs=1e-6), pytest.approx(raw_pixel, abs=1e-6))
    for values in (batch.pred_score, batch.anomaly_map):  # in [0, 1], so torchmetrics applies no sigmoid
        assert values.min() == 0 and values.max() == 1
    # the threshold moves with the scores: the same labels as the raw scores against the raw thresholds
    assert torch.equal(batch.pred_label, raw.pred_score > post_processor.image_threshold)
    assert torch.equal(batch.pred_mask, raw.anomaly_map > post_processor.pixel_threshold)
    _, default_image, default_pixel = post_processed(PostProcessor())
    assert default_image != pytest.approx(raw_image, abs=1e-3) and default_pixel != pytest.approx(raw_pixel, abs=1e-3)


def test_ablation_writes_one_row_per_loss_configuration(tiny_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "ablation"
    run_script("ablation.py", "--root", str(tiny_root), *TINY, "--output", str(output), cwd=tmp_path)
    results = pd.read_csv(output / "results.csv")
    assert results.losses.tolist() == ABLATION_LABELS
    assert_scores(results, METRICS)
    assert_report(output / "report.md", [*ABLATION_LABELS, "against GKD only"])
    assert_png(output / "metrics.png")


def test_speed_measures_tdad_and_the_teacher_with_openvino_and_streaming(tiny_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "speed"
    args = ["--root", str(tiny_root), "--category", "brick", "--image-size", "64", "--models", "tdad", "--threads", "1"]
    args += ["--train-images", "8", "--infer-images", "8", "--stream-images", "24", "--output", str(output)]
    run_script("speed.py", *args, cwd=tmp_path)
    speed = pd.read_csv(output / "speed.csv").set_index("model")
    assert speed.index.tolist() == ["TDAD", "teacher only"]
    assert speed.error.isna().all()
    assert speed.loc["TDAD", "train_s_per_epoch"] > 0
    for column in ["eager_images_per_s", "openvino_images_per_s", "eager_mem_mb", "openvino_mem_mb"]:
        assert (speed[column] > 0).all(), column
    stream = pd.read_csv(output / "stream.csv")
    assert stream.images.tolist() == [0, 8, 16, 24]
    assert (stream.rss_mb > 0).all()
    assert_report(output / "report.md", ["TDAD / teacher only", "Streaming"])
    assert_png(output / "stream.png")


def model_entries(config_name: str) -> list[dict]:
    """The model grid of a benchmark config, after checking the parts every config shares."""
    config = yaml.safe_load((BENCHMARKS / config_name).read_text(encoding="utf-8"))
    data = config["benchmark"]["data"]
    assert data["class_path"] == "MVTecAD"
    assert set(data["init_args"]["category"]["grid"]) == MVTEC_CATEGORIES
    return config["benchmark"]["model"]["grid"]


@pytest.mark.parametrize("config_name", ["mvtec_wide_resnet50.yaml", "mvtec_lite0_offline.yaml"])
def test_benchmark_config_models_exist_and_take_their_arguments(config_name: str) -> None:
    import anomalib.models

    for entry in model_entries(config_name):
        model_class = getattr(anomalib.models, entry["class_path"])  # a bare name, as `anomalib benchmark` needs
        accepted = inspect.signature(model_class).parameters
        assert set(entry.get("init_args", {})) <= set(accepted), entry


def test_wide_resnet_config_runs_with_bare_anomalib_benchmark() -> None:
    """anomalib 2.7 collects results with the first job's keys only: every entry must have the same ones.

    Guards benchmarks/README's promise that this config also runs under bare ``anomalib benchmark``.
    """
    entries = model_entries("mvtec_wide_resnet50.yaml")
    assert {entry["class_path"] for entry in entries} == {"Tdad", "Patchcore", "ReverseDistillation", "Stfpm", "Padim"}
    assert len({tuple(sorted(entry["init_args"])) for entry in entries}) == 1
    assert {entry["init_args"]["backbone"] for entry in entries} == {"wide_resnet50_2"}


def test_offline_config_models_build_without_network() -> None:
    from anomalib.models import get_model

    entries = model_entries("mvtec_lite0_offline.yaml")
    models = [get_model(entry) for entry in entries]
    assert [type(model).__name__ for model in models] == ["Tdad", "Tdad", "Patchcore", "Stfpm", "Padim"]
    rd = models[1].hparams  # the RD stand-in: plain reverse distillation
    assert (rd.lambda_gkd, rd.lambda_scd, rd.lambda_dmd) == (1.0, 0.0, 0.0)


@pytest.mark.slow
def test_run_benchmark_offline_config_on_tiny_data(tiny_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "benchmark"
    args = ["--config", str(BENCHMARKS / "mvtec_lite0_offline.yaml"), "--root", str(tiny_root)]
    args += ["--categories", "brick", "--max-epochs", "1", "--accelerator", "cpu", "--output", str(output)]
    run_script("run_benchmark.py", *args, cwd=tmp_path)
    results = pd.read_csv(output / "results.csv")
    assert sorted(results.model) == sorted(MODEL_LABELS)
    assert_scores(results, METRICS)
    assert_report(output / "report.md", MODEL_LABELS)
    assert_png(output / "metrics.png")


def test_benchmark_epochs_default_to_the_package_training_length(common: ModuleType) -> None:
    """Without ``--max-epochs`` the scripts train as long as the package does; memory banks fit once."""
    import argparse

    from anomalib_tdad import Tdad

    parser = argparse.ArgumentParser()
    common.add_data_args(parser)
    epochs = common.parse_epochs(parser.parse_args([]).max_epochs)
    package_default = inspect.signature(Tdad).parameters["default_epochs"].default
    assert epochs("tdad") == epochs("rd") == epochs("stfpm") == package_default
    assert epochs("patchcore") == epochs("padim") == 1
    override = common.parse_epochs(parser.parse_args(["--max-epochs", "10", "stfpm=20"]).max_epochs)
    assert (override("tdad"), override("stfpm"), override("padim")) == (10, 20, 1)
