"""INT8 OpenVINO export of TDAD: NNCF quantizes the teacher and the student, never the anomaly-map head.

anomalib 2.7's ``int8_ptq`` quantizes every activation, the map head included, each to 256 levels of a range
estimated on the calibration images: that range cuts off the top of the map (the summed standardized distances of
a trained tiny TDAD reach 13.3 but are clipped at 8.6), and as the image score is the map's maximum, every image
that reaches the clip gets the same score to 4 decimals, all 16 test images in that case. Its ``int8_acq`` does
not repair it: its search reverted network quantizers only, none of the head's, and gave up short of
``max_drop`` (its validation metric is also never reset, so it scores the predictions of every model tried so
far together), and it saves the broken model anyway. Here the head (everything from the features' L2 norms to
the outputs: distances, standardization, upsampling, blur, post-processing) stays in float32; the convolutions,
where the time goes, run in INT8. Calibration and validation data are anomalib's: the datamodule's validation
set calibrates, its test set validates ``int8_acq``.
"""

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
from anomalib import TaskType
from anomalib.data import AnomalibDataModule, ImageBatch
from anomalib.deploy import CompressionType
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchvision.transforms.v2.functional import resize

logger = logging.getLogger(__name__)

ONNX_OPSET = 18  # what torch's exporter writes for TDAD (see Tdad.to_onnx)
NNCF_COMPRESSION = frozenset({CompressionType.INT8, CompressionType.INT8_PTQ, CompressionType.INT8_ACQ})
QUANTIZATION = frozenset({CompressionType.INT8_PTQ, CompressionType.INT8_ACQ})


def check_nncf(compression_type: CompressionType | str | None) -> None:
    """Name the extra to install when ``compression_type`` needs NNCF and NNCF is missing."""
    if compression_type is None or CompressionType(compression_type) not in NNCF_COMPRESSION:
        return
    if importlib.util.find_spec("nncf") is None:
        mode = CompressionType(compression_type).value
        msg = f"INT8 export (compression_type='{mode}') needs NNCF: pip install 'anomalib-tdad[int8]'"
        raise ModuleNotFoundError(msg, name="nncf")


def map_head(model: Any) -> list[str]:  # noqa: ANN401  # openvino.Model (openvino is imported lazily)
    """Names of the ops of ``model`` (an OpenVINO model of TDAD) from the features' L2 norms to the outputs."""
    stack = [op for op in model.get_ordered_ops() if op.get_type_name() == "ReduceL2"]
    if not stack:
        msg = "No ReduceL2 (cosine distance) in the exported graph: cannot tell TDAD's map head from its networks."
        raise RuntimeError(msg)
    head: set[str] = set()
    while stack:
        op = stack.pop()
        if op.get_friendly_name() not in head:
            head.add(op.get_friendly_name())
            stack.extend(target.get_node() for output in op.outputs() for target in output.get_target_inputs())
    return sorted(head)


def static_size(model: Any) -> tuple[int, int] | None:  # noqa: ANN401  # openvino.Model or CompiledModel
    """The input height and width an exported model was fixed to (``input_size`` at export), else None."""
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or not (shape[2].is_static and shape[3].is_static):
        return None
    return shape[2].get_length(), shape[3].get_length()


def images(batch: ImageBatch, size: tuple[int, int] | None = None) -> Any:  # noqa: ANN401  # numpy array
    """A batch's images as the exported model takes them: resized to ``size`` (a fixed input size) first, as the
    model's pre-processor would resize them, since such a graph refuses any other."""
    image = batch.image
    if size is not None and tuple(image.shape[-2:]) != size:
        image = resize(image, list(size), antialias=True)
    return image.numpy()


class CalibrationImages:
    """A dataloader's images one by one, ``(1, 3, H, W)`` arrays: NNCF counts samples (``subset_size``) in images.

    ``size``: the model's fixed input size, if any (see :func:`images`).
    """

    def __init__(self, dataloader: DataLoader, size: tuple[int, int] | None = None) -> None:
        self.dataloader = dataloader
        self.size = size

    def __len__(self) -> int:
        return len(self.dataloader.dataset)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.dataloader:
            yield from images(batch, self.size)[:, None]


class HideIgnoredScope(logging.Filter):
    """Drop NNCF's line per op of the ignored scope ("Not adding activation input quantizer for operation ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Not adding activation input quantizer")


@contextlib.contextmanager
def quiet_ignored_scope() -> Iterator[None]:
    """NNCF without its per-op lines about the ignored map head inside the block."""
    nncf_logger, hide = logging.getLogger("nncf"), HideIgnoredScope()
    nncf_logger.addFilter(hide)
    try:
        yield
    finally:
        nncf_logger.removeFilter(hide)


def predict_batch(compiled: Any, batch: ImageBatch) -> ImageBatch:  # noqa: ANN401  # openvino.CompiledModel
    """``batch`` with the predictions of an exported anomalib model (``compiled``) on its images.

    Its ground-truth masks stay as given: at the datamodule's size, where the maps are at the model's.
    """
    result = compiled(images(batch, static_size(compiled)))
    outputs = {output.get_any_name(): torch.from_numpy(result[output]) for output in compiled.outputs}
    size = (batch.image.shape[0], *outputs["anomaly_map"].shape[-2:])
    return ImageBatch(
        image=batch.image,
        gt_label=batch.gt_label,
        gt_mask=batch.gt_mask,
        image_path=batch.image_path,
        pred_score=outputs["pred_score"].reshape(-1),
        pred_label=outputs["pred_label"].reshape(-1),
        anomaly_map=outputs["anomaly_map"].reshape(size),
        pred_mask=outputs["pred_mask"].reshape(size),
    )


def validation_function(metric: Metric) -> Callable[[Any, Iterable[ImageBatch]], float]:
    """NNCF's validation function for ``int8_acq``: ``metric`` (anomalib's, from a fresh state) of the predictions."""

    def validate(compiled: Any, batches: Iterable[ImageBatch]) -> float:  # noqa: ANN401  # openvino.CompiledModel
        metric.reset()
        for batch in batches:
            metric.update(predict_batch(compiled, batch))
        return float(metric.compute())

    return validate


def quantize(
    model: Any,  # noqa: ANN401  # openvino.Model
    compression_type: CompressionType,
    datamodule: AnomalibDataModule | None,
    metric: Metric | None = None,
    max_drop: float = 0.01,
) -> Any:  # noqa: ANN401
    """``model`` quantized by NNCF (``int8_ptq`` or ``int8_acq``), its map head left in float."""
    import nncf

    if datamodule is None:
        msg = (
            f"INT8 export (compression_type='{compression_type.value}') calibrates on a datamodule: "
            "pass --data ... to anomalib export (datamodule=... in Python)."
        )
        raise ValueError(msg)
    datamodule.setup("fit")
    if model.input(0).partial_shape[0].is_static:
        datamodule.eval_batch_size = model.input(0).shape[0]
    calibration = nncf.Dataset(CalibrationImages(datamodule.val_dataloader(), static_size(model)))
    head = map_head(model)
    logger.info("INT8 (%s): %d ops of the anomaly-map head stay in float32.", compression_type.value, len(head))
    ignored = nncf.IgnoredScope(names=head)
    if compression_type == CompressionType.INT8_PTQ:
        with quiet_ignored_scope():
            return nncf.quantize(model, calibration, ignored_scope=ignored)
    if metric is None:
        from anomalib.metrics import F1Score

        metric = F1Score(fields=["pred_label", "gt_label"])
    if not isinstance(metric, Metric):
        msg = f"int8_acq needs an anomalib metric object, e.g. AUROC(fields=['pred_score', 'gt_label']), not {metric!r}"
        raise TypeError(msg)
    if not 0 <= max_drop <= 1:
        msg = f"max_drop must be between 0 and 1, got {max_drop}"
        raise ValueError(msg)
    validation = nncf.Dataset(datamodule.test_dataloader())
    with quiet_ignored_scope():
        return nncf.quantize_with_accuracy_control(
            model, calibration, validation, validation_function(metric), max_drop=max_drop, ignored_scope=ignored
        )


def to_openvino(
    anomalib_export: Callable[..., Path],
    export_root: Path | str,
    model_file_name: str = "model",
    input_size: tuple[int, int] | None = None,
    compression_type: CompressionType | str | None = None,
    datamodule: AnomalibDataModule | None = None,
    metric: Metric | None = None,
    task: TaskType | None = None,
    max_drop: float = 0.01,
    ov_kwargs: dict[str, Any] | None = None,
    onnx_kwargs: dict[str, Any] | None = None,
) -> Path:
    """``anomalib_export`` (anomalib's ``to_openvino``), except that INT8 quantization keeps the map head in float.

    ``int8_ptq``/``int8_acq``: anomalib exports a float32 IR to a temporary folder, :func:`quantize` quantizes
    it, and it is saved where anomalib would have saved it. Every other compression type is anomalib's own.
    """
    check_nncf(compression_type)
    if compression_type is None or CompressionType(compression_type) not in QUANTIZATION:
        options = (input_size, compression_type, datamodule, metric, task, max_drop, ov_kwargs, onnx_kwargs)
        return anomalib_export(export_root, model_file_name, *options)
    import openvino as ov

    with TemporaryDirectory() as folder:
        float_path = anomalib_export(folder, model_file_name, input_size, ov_kwargs=ov_kwargs, onnx_kwargs=onnx_kwargs)
        model = quantize(
            ov.Core().read_model(float_path), CompressionType(compression_type), datamodule, metric, max_drop
        )
        path = Path(export_root) / "weights" / "openvino" / f"{model_file_name}.xml"
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, path, compress_to_fp16=False)  # as anomalib saves every INT8 model
    return path
