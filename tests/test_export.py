"""Exported models agree with torch: the same anomaly maps and scores from ONNX and OpenVINO."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from PIL import Image

from anomalib_tdad import Tdad

SIZE = (256, 256)


@pytest.fixture(scope="module")
def exported(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tdad, Path, torch.Tensor]:
    """A briefly trained TDAD (post-processor fitted), its ONNX and OpenVINO exports, and test images."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    model = Tdad()
    datamodule = MVTecAD(root=tiny_root, category="brick", train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    model.to_onnx(root, input_size=SIZE)
    model.to_openvino(root, input_size=SIZE)
    paths = sorted((tiny_root / "brick" / "test").rglob("*.png"))[:4]
    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize(SIZE), dtype=np.float32) / 255).permute(
                2, 0, 1
            )
            for p in paths
        ]
    )
    return model.eval(), root, images


def _torch_outputs(model: Tdad, images: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        output = model(images)
    return {"pred_score": output.pred_score.numpy(), "anomaly_map": output.anomaly_map.numpy()}


def _by_name(names: list[str], values: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def _assert_close(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
    for name in ("pred_score", "anomaly_map"):
        expected, actual = reference[name], other[name].reshape(reference[name].shape)
        assert np.isfinite(actual).all()
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_onnx_matches_torch(exported: tuple[Tdad, Path, torch.Tensor]) -> None:
    import onnxruntime

    model, root, images = exported
    session = onnxruntime.InferenceSession(
        str(root / "weights" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    outputs = _by_name(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}))
    _assert_close(_torch_outputs(model, images), outputs)


def test_openvino_matches_torch_at_f32(exported: tuple[Tdad, Path, torch.Tensor]) -> None:
    import openvino as ov

    model, root, images = exported
    compiled = ov.Core().compile_model(
        str(root / "weights" / "openvino" / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    result = compiled(images.numpy())
    outputs = {output.get_any_name(): result[output] for output in compiled.outputs}
    _assert_close(_torch_outputs(model, images), outputs)


def test_exported_scores_rank_defects_like_torch(exported: tuple[Tdad, Path, torch.Tensor]) -> None:
    """The export keeps the post-processor: normalized scores in [0, 1] and labels from the same threshold."""
    model, _, images = exported
    with torch.no_grad():
        output = model(images)
    assert torch.all((output.pred_score >= 0) & (output.pred_score <= 1))
    assert output.pred_label is not None and output.pred_mask is not None
