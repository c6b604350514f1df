"""Exported models agree with torch: the same anomaly maps, scores and labels from ONNX and OpenVINO.

The exports are ``anomalib export``'s, from the checkpoint of the shared trained model.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Trained, export_cli
from PIL import Image
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

Outputs = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def exported(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``anomalib export`` of the shared trained TDAD's checkpoint to ONNX and OpenVINO; returns the export root.

    The CLI calls the Python API (``to_onnx``, ``to_openvino``), so this covers both ways to export.
    """
    root = tmp_path_factory.mktemp("export")
    for export_type in ("onnx", "openvino"):
        export_cli(trained.checkpoint, export_type, root)
    return root


@pytest.fixture(scope="module")
def test_images(trained: Trained) -> tuple[torch.Tensor, np.ndarray]:
    """Every test image of the trained model's dataset as a ``(N, 3, H, W)`` batch in [0, 1], and its labels."""
    paths = sorted((trained.root / "brick" / "test").rglob("*.png"))
    pixels = [np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255 for path in paths]
    labels = np.array([path.parent.name != "good" for path in paths])
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(), labels


def run_torch(model: torch.nn.Module, images: torch.Tensor) -> Outputs:
    model.eval()
    with torch.no_grad():
        output = model(images)
    return {name: value.numpy() for name, value in output._asdict().items() if value is not None}


def run_onnx(root: Path, images: torch.Tensor) -> Outputs:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(root / "weights" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    values = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def run_openvino(root: Path, images: torch.Tensor) -> Outputs:
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(root / "weights" / "openvino" / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    result = compiled(images.numpy())
    return {output.get_any_name(): np.asarray(result[output]) for output in compiled.outputs}


RUNTIMES: dict[str, Callable[[Path, torch.Tensor], Outputs]] = {"onnx": run_onnx, "openvino_f32": run_openvino}


@pytest.fixture(scope="module", params=list(RUNTIMES))
def runtime_outputs(
    request: pytest.FixtureRequest, trained: Trained, exported: Path, test_images: tuple[torch.Tensor, np.ndarray]
) -> tuple[Outputs, Outputs]:
    """(torch's, the exported model's) outputs on the test images, for each runtime."""
    images, _ = test_images
    return run_torch(trained.model, images), RUNTIMES[request.param](exported, images)


def test_exported_model_matches_torch(runtime_outputs: tuple[Outputs, Outputs]) -> None:
    reference, other = runtime_outputs
    assert set(other) == set(reference) == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}
    for name in ("pred_score", "anomaly_map"):
        expected, actual = reference[name], other[name].reshape(reference[name].shape)
        assert np.isfinite(actual).all()
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_exported_scores_rank_defects_like_torch(
    trained: Trained, runtime_outputs: tuple[Outputs, Outputs], test_images: tuple[torch.Tensor, np.ndarray]
) -> None:
    """The export keeps the post-processor: scores in [0, 1] ordered as torch's, labels from the same threshold.

    Defective images score above good ones on average (the shared model is trained enough to find most defects).
    """
    reference, other = runtime_outputs
    _, labels = test_images
    expected, actual = reference["pred_score"].ravel(), other["pred_score"].ravel()
    assert ((actual >= 0) & (actual <= 1)).all()
    assert len(np.unique(expected)) > len(expected) // 2  # enough distinct scores for the ranking to mean something
    assert spearmanr(actual, expected).statistic == pytest.approx(1.0)
    # every pair torch orders (beyond float noise) the export orders the same way; torch's exact ties stay tied
    gap = np.subtract.outer(expected, expected)
    order = np.sign(np.subtract.outer(actual, actual))
    assert (order[gap > 1e-3] == 1).all() and (order[gap < -1e-3] == -1).all()
    assert (actual[:, None] == actual[None, :])[gap == 0].all()
    assert roc_auc_score(labels, actual) == roc_auc_score(labels, expected) > 0.5
    assert actual[labels].mean() > actual[~labels].mean()
    # the same labels, but for an image scored at the threshold itself (the F1 threshold is one of the scores of
    # the validation images, here the test images), where float noise decides the side
    threshold = float(trained.model.post_processor.normalized_image_threshold)
    clear = np.abs(expected - threshold) > 1e-4
    assert clear.sum() >= len(expected) - 1
    np.testing.assert_array_equal(other["pred_label"].ravel()[clear], reference["pred_label"].ravel()[clear])
