"""anomalib's own, unmodified CLI drives TDAD end to end: train, test, predict, export, benchmark."""

from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import mvtec_args, run_anomalib

CONFIGS = Path(__file__).parents[1] / "configs"
FAST = (
    "--data.num_workers",
    "0",
    "--data.train_batch_size",
    "8",
    "--data.eval_batch_size",
    "8",
    "--trainer.max_epochs",
    "1",
)


@pytest.fixture(scope="module")
def trained(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train with the old dataset name ``MVTec`` and a loss weight from the command line; return (workdir, ckpt)."""
    workdir = tmp_path_factory.mktemp("cli")
    result = run_anomalib(
        "train",
        "--model",
        "Tdad",
        "--model.lambda_dmd",
        "0.5",
        *mvtec_args(tiny_root, "MVTec"),
        *FAST,
        "--default_root_dir",
        "results",
        cwd=workdir,
    )
    assert "image_AUROC" in result.stdout
    checkpoints = list(workdir.glob("results/Tdad/MVTec/brick/v0/weights/lightning/model.ckpt"))
    assert len(checkpoints) == 1
    return workdir, checkpoints[0]


def test_train_saves_the_hyper_parameters_given_on_the_command_line(trained: tuple[Path, Path]) -> None:
    import torch

    checkpoint = torch.load(trained[1], map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["lambda_dmd"] == 0.5
    assert checkpoint["hyper_parameters"]["backbone"] == "tf_efficientnet_lite0"


def test_train_with_dotted_model_path_and_yaml_config(tiny_root: Path, tmp_path: Path) -> None:
    result = run_anomalib(
        "train",
        "--config",
        str(CONFIGS / "rd_baseline.yaml"),
        "--model",
        "anomalib_tdad.Tdad",
        "--model.lambda_scd",
        "0",
        "--model.lambda_dmd",
        "0",
        "--data.root",
        str(tiny_root),
        "--data.category",
        "brick",
        *FAST,
        "--trainer.limit_train_batches",
        "1",
        "--default_root_dir",
        "results",
        cwd=tmp_path,
    )
    assert "pixel_AUROC" in result.stdout


def test_test_command_reports_metrics(trained: tuple[Path, Path], tiny_root: Path) -> None:
    workdir, checkpoint = trained
    result = run_anomalib(
        "test",
        "--model",
        "Tdad",
        *mvtec_args(tiny_root),
        "--data.num_workers",
        "0",
        "--ckpt_path",
        str(checkpoint),
        "--default_root_dir",
        "results",
        cwd=workdir,
    )
    assert "image_AUROC" in result.stdout and "pixel_AUROC" in result.stdout


def test_predict_on_an_image_folder_writes_heatmaps(trained: tuple[Path, Path], tiny_root: Path) -> None:
    workdir, checkpoint = trained
    folder = tiny_root / "brick" / "test" / "hole"
    run_anomalib(
        "predict",
        "--model",
        "Tdad",
        "--data",
        str(folder),
        "--ckpt_path",
        str(checkpoint),
        "--default_root_dir",
        "predictions",
        cwd=workdir,
    )
    written = list((workdir / "predictions").rglob("*.png"))
    assert len(written) == len(list(folder.glob("*.png")))


@pytest.mark.parametrize(
    ("export_type", "artifact"),
    [("torch", "torch/model.pt"), ("onnx", "onnx/model.onnx"), ("openvino", "openvino/model.xml")],
)
def test_export(trained: tuple[Path, Path], export_type: str, artifact: str) -> None:
    workdir, checkpoint = trained
    root = workdir / f"export_{export_type}"
    run_anomalib(
        "export",
        "--model",
        "Tdad",
        "--export_type",
        export_type,
        "--ckpt_path",
        str(checkpoint),
        "--export_root",
        str(root),
        cwd=workdir,
    )
    assert (root / "weights" / artifact).stat().st_size > 100_000


def test_benchmark_config_with_bare_class_path(tiny_root: Path, tmp_path: Path) -> None:
    config = {
        "accelerator": ["cpu"],
        "benchmark": {
            "seed": 42,
            "model": {"class_path": "Tdad", "init_args": {"default_epochs": 1, "lambda_dmd": {"grid": [0.0, 1.0]}}},
            "data": {
                "class_path": "MVTecAD",
                "init_args": {
                    "root": str(tiny_root),
                    "category": "brick",
                    "num_workers": 0,
                    "train_batch_size": 8,
                    "eval_batch_size": 8,
                },
            },
        },
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    run_anomalib("benchmark", "--config", "bench.yaml", cwd=tmp_path, timeout=900)
    csvs = list(tmp_path.rglob("*.csv"))
    assert csvs, "anomalib benchmark wrote no results"
    results = pd.concat(pd.read_csv(path) for path in csvs)
    assert len(results) == 2 and set(results["model.class_path"]) == {"Tdad"}
    assert sorted(results["model.init_args.lambda_dmd"]) == [0.0, 1.0]
    assert results["image_AUROC"].between(0, 1).all()
