"""anomalib's own, unmodified CLI drives TDAD end to end: train (from a YAML config), test, export, benchmark.

Elsewhere: ``anomalib export`` to ONNX and OpenVINO in ``test_export`` (which runs the exported models),
``anomalib predict`` in ``test_reliability`` (heatmaps of an image folder, refused checkpoints).
"""

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import export_cli, mvtec_args, run_anomalib

CONFIGS = Path(__file__).parents[1] / "configs"
FAST = [
    "--data.num_workers", "0", "--data.train_batch_size", "8", "--data.eval_batch_size", "8",
    "--trainer.max_epochs", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def cli_trained(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train from the RD-baseline YAML config, one loss weight overridden on the command line; (workdir, ckpt)."""
    workdir = tmp_path_factory.mktemp("cli")
    config = ["--config", str(CONFIGS / "rd_baseline.yaml"), "--model.lambda_dmd", "0.5"]
    data = ["--data.root", str(tiny_root), "--data.category", "brick"]
    result = run_anomalib("train", *config, *data, *FAST, "--default_root_dir", "results", cwd=workdir)
    assert "image_AUROC" in result.stdout and "pixel_AUROC" in result.stdout  # tested right after training
    checkpoints = list(workdir.glob("results/Tdad/MVTecAD/brick/v0/weights/lightning/model.ckpt"))
    assert len(checkpoints) == 1
    return workdir, checkpoints[0]


def test_train_saves_the_config_and_command_line_hyper_parameters(cli_trained: tuple[Path, Path]) -> None:
    checkpoint = torch.load(cli_trained[1], map_location="cpu", weights_only=False)
    config = yaml.safe_load((CONFIGS / "rd_baseline.yaml").read_text())["model"]["init_args"]
    assert checkpoint["hyper_parameters"]["lambda_scd"] == config["lambda_scd"]  # from the config
    assert checkpoint["hyper_parameters"]["lambda_dmd"] == 0.5 != config["lambda_dmd"]  # the command line wins
    assert checkpoint["hyper_parameters"]["backbone"] == "tf_efficientnet_lite0"  # the default: offline teacher


def test_test_command_with_dotted_model_path_and_old_data_name(cli_trained: tuple[Path, Path], tiny_root: Path) -> None:
    workdir, checkpoint = cli_trained
    model = ["--model", "anomalib_tdad.Tdad", "--ckpt_path", str(checkpoint)]
    result = run_anomalib("test", *model, *mvtec_args(tiny_root, "MVTec"), "--data.num_workers", "0", cwd=workdir)
    assert "image_AUROC" in result.stdout and "pixel_AUROC" in result.stdout


def test_export_to_torch(cli_trained: tuple[Path, Path]) -> None:
    workdir, checkpoint = cli_trained
    root = export_cli(checkpoint, "torch", workdir / "export_torch")
    assert (root / "weights" / "torch" / "model.pt").stat().st_size > 100_000


def test_benchmark_config_with_bare_class_path(tiny_root: Path, tmp_path: Path) -> None:
    """``anomalib benchmark`` sets no training length: ``default_epochs`` keeps each run to one epoch."""
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
