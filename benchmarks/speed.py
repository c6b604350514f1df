"""Cost of TDAD against PatchCore, STFPM and the teacher's forward pass alone, in one process.

On the CPU, with the same images, input size and number of threads for every model (torch and OpenVINO):

- training seconds per epoch over the chosen training images (PatchCore: its one fitting epoch,
  feature extraction plus coreset selection), no validation;
- inference images per second in torch eager (the whole anomalib model: pre-processing, network,
  post-processing) and through the model exported with anomalib's ``to_openvino`` (compiled with
  ``INFERENCE_PRECISION_HINT=f32``; OpenVINO defaults to bf16 on CPUs that have it), and through its INT8
  export (``int8_ptq``, calibrated on the validation images; ``--no-int8`` skips it);
- peak resident memory (RSS) of the process during each phase.

Writes ``speed.csv`` and ``report.md`` with the ratios TDAD / peer and TDAD / teacher-only to ``--output``.
With ``--stream-images N`` it also runs TDAD over a folder of N images (the test images repeated), read
from disk batch by batch, records RSS after every batch (``stream.csv``, ``stream.png``) and reports whether
memory stays flat.

With ``--teacher-calls N ...`` it instead times the teacher alone in calls of N images at each ``--image-size``
(the measurement behind the teacher's ``CPU_CHUNK_PIXELS``).

With ``--fit-data`` it instead times the run a user makes, ``anomalib train --model Tdad`` with anomalib's
default Engine (validation at the model's cadence, the datamodule's own batch size and workers), for
``--fit-epochs`` epochs, once per source checkout in ``--fit-versions`` (each in a fresh process, that
checkout first on ``PYTHONPATH``), and reports seconds per epoch and the ratio against the first one.

Examples (a smoke run; this version against the one in ../old on KolektorSDD)::

    python benchmarks/speed.py --train-images 16 --infer-images 16 --image-size 128 --stream-images 200
    python benchmarks/speed.py --teacher-calls 1 2 4 8 16 32 64 --image-size 128 256 512
    python benchmarks/speed.py --fit-epochs 10 --fit-versions ../old . \
        --fit-data '{"class_path": "Kolektor", "init_args": {"root": "../shared/data/kolektor"}}'
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, final

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.callbacks import ModelCheckpoint
from anomalib.engine import Engine
from anomalib.models import AnomalibModule, Patchcore
from lightning.pytorch import Callback, seed_everything
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from anomalib_tdad.export import check_nncf

MODELS = ["tdad", "patchcore", "patchcore-default-bank", "stfpm"]
ANOMALIB_CORESET_RATIO = 0.1  # Patchcore's default coreset_sampling_ratio
DEFAULT_BANK_LABEL = f"PatchCore, bank of ratio {ANOMALIB_CORESET_RATIO} (random)"
TEACHER_LABEL = "teacher only"
REPEATS = 3  # timed inference passes per model; the best one counts
FLAT_MB = 50  # streaming memory counts as flat when it grows less than this after the first tenth
COLUMNS = [
    "train_s_per_epoch",
    "train_ms_per_image",
    "eager_images_per_s",
    "openvino_images_per_s",
    "openvino_int8_images_per_s",
    "train_mem_mb",
    "eager_mem_mb",
    "openvino_mem_mb",
    "openvino_int8_mem_mb",
    "base_rss_mb",
]
METHOD_NOTE = (
    "Training time is one epoch over the training images without validation (PatchCore: feature extraction plus "
    "coreset selection, which grows with the square of the number of patches). Eager inference times the whole "
    "anomalib model (pre-processing, network, post-processing) in `torch.inference_mode`; OpenVINO times the model "
    "exported by anomalib's `to_openvino` (the teacher alone: `openvino.convert_model`), compiled in f32; OpenVINO "
    "INT8 the same model exported with `compression_type=int8_ptq` (the teacher alone: `nncf.quantize`), calibrated "
    "on the validation images. Each "
    "inference "
    f"speed is the best of {REPEATS} passes over the timed images, the pass least disturbed by other processes. Memory "
    "(`*_mem_mb`) is the process's peak RSS during the phase (Linux's high-water mark, reset at the phase start) "
    "minus its RSS just before the model was built (`base_rss_mb`: libraries and data, freed earlier models "
    "trimmed); for OpenVINO, minus the RSS after the torch model was freed, so it counts compiling and running the "
    "exported model. A warm-up (one STFPM batch, one OpenVINO compile) loads the libraries before the first "
    "measurement."
)

# ---------------------------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident memory of this process in MB (without /proc: the peak so far)."""
    current = _status_mb("VmRSS")
    if current is not None:
        return current
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so each phase starts from what is really in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@final
class PeakRSS:
    """Peak RSS in MB during a ``with`` block.

    Linux's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) where it can be reset,
    and in any case a thread sampling the RSS every few milliseconds.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start = self.peak = 0.0
        self._exact = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> PeakRSS:
        release_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._exact = True
        except OSError:
            self._exact = False
        self.start = self.peak = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(), (_status_mb("VmHWM") or 0.0) if self._exact else 0.0)


# ---------------------------------------------------------------------------------------------- timing


class _TrainTimer(Callback):
    """Wall time from the start to the end of training (after PatchCore's coreset selection)."""

    start = end = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self.start = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self.end = time.perf_counter()


def train_seconds(model: AnomalibModule, data: common.DataConfig, epochs: int) -> float:
    """Seconds of training (no validation, no checkpoint) divided by the epochs run."""
    timer = _TrainTimer()
    with tempfile.TemporaryDirectory() as workdir:
        engine = Engine(
            max_epochs=epochs,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            accelerator="cpu",
            devices=1,
            default_root_dir=workdir,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(save_top_k=0, save_last=False), timer],
        )
        engine.fit(model=model, datamodule=common.make_datamodule(data))
    return (timer.end - timer.start) / epochs


@torch.inference_mode()
def images_per_second(
    forward: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor], repeats: int = REPEATS
) -> float:
    """Throughput of ``forward`` over ``batches``: the best of ``repeats`` timed passes after one warm-up batch.

    The best pass is the one least disturbed by other processes on a shared machine (as ``timeit`` advises).
    """
    seconds = best_seconds(partial(_each, forward, batches), repeats, warm_up=partial(forward, batches[0]))
    return sum(len(batch) for batch in batches) / seconds


def openvino_forward(model: Any, threads: int) -> Callable[[torch.Tensor], Any]:
    """Compile an OpenVINO model (``.xml`` path or ``openvino.Model``) for the CPU in f32 with ``threads``."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    )
    batch_dim = compiled.inputs[0].get_partial_shape()[0]
    if batch_dim.is_dynamic:
        return lambda batch: compiled(batch.numpy())
    # anomalib's export can fix the batch size in the graph (PatchCore at 256 px: 2): feed batches in such chunks.
    return lambda batch: [compiled(chunk.numpy()) for chunk in batch.split(batch_dim.get_length())]


def fixed_batch(model: Any) -> int | None:  # openvino.Model or a path to one
    """The batch size an exported graph was fixed to (anomalib's PatchCore export at 256 px: 2), else None."""
    import openvino as ov

    graph = ov.Core().read_model(model) if isinstance(model, Path) else model
    batch = graph.inputs[0].get_partial_shape()[0]
    return batch.get_length() if batch.is_static else None


def to_openvino(model: nn.Module, folder: str, example: torch.Tensor, data: common.DataConfig | None = None) -> Any:
    """The model as OpenVINO sees it: anomalib's own export for anomalib models, else ``convert_model``.

    With ``data``, quantized to INT8 by NNCF: anomalib models through their ``int8_ptq`` export, the teacher alone
    by ``nncf.quantize``, calibrated on the datamodule's validation images resized to ``example``'s size (the
    exported graphs are fixed to it).
    """
    import openvino as ov
    from anomalib.deploy import CompressionType

    datamodule = common.make_datamodule(data, val_size=example.shape[-1]) if data else None
    if isinstance(model, AnomalibModule):
        compression = CompressionType.INT8_PTQ if data else None
        return Path(
            model.to_openvino(
                folder, input_size=tuple(example.shape[-2:]), compression_type=compression, datamodule=datamodule
            )
        )
    converted = ov.convert_model(model, example_input=example)
    if datamodule is None:
        return converted
    import nncf

    datamodule.setup("fit")
    return nncf.quantize(converted, nncf.Dataset([batch.image.numpy() for batch in datamodule.val_dataloader()]))


class TeacherOnly(nn.Module):
    """TDAD's teacher alone: normalization and the frozen timm feature extractor, nothing else."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        from anomalib_tdad import Tdad
        from anomalib_tdad.models.tdad.teacher import Teacher

        self.pre_processor = Tdad.configure_pre_processor(image_size=(image_size, image_size))
        self.teacher = Teacher(common.TEACHER, common.TDAD_LAYERS).eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Teacher features, finest level first."""
        return tuple(self.teacher(self.pre_processor(images)))


class EpochClock(Callback):
    """Wall time of every training epoch (validation inside it included) and of its validation."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.validations: list[float] = []
        self._epoch = self._validation = 0.0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self._epoch = time.perf_counter()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self._validation = time.perf_counter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self.validations.append(time.perf_counter() - self._validation)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self.epochs.append(time.perf_counter() - self._epoch)


def user_fit(data: dict[str, Any], epochs: int, threads: int) -> dict[str, Any]:
    """Fit the default ``Tdad`` with anomalib's default Engine (``max_epochs`` set) on ``data``; its timings."""
    from anomalib.data import get_datamodule

    import anomalib_tdad
    from anomalib_tdad import Tdad

    torch.set_num_threads(threads)
    seed_everything(0)
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as workdir:
        engine = Engine(max_epochs=epochs, default_root_dir=workdir, logger=False, callbacks=[clock])
        start = time.perf_counter()
        engine.fit(model=Tdad(), datamodule=get_datamodule(data))
        total = time.perf_counter() - start
    return {
        "version": anomalib_tdad.__version__,
        "source": str(Path(anomalib_tdad.__file__).parent.parent),
        "epochs": len(clock.epochs),
        "fit_s": total,
        "s_per_epoch": sum(clock.epochs) / len(clock.epochs),
        "first_epoch_s": clock.epochs[0],
        "later_epochs_s": sum(clock.epochs[1:]) / max(1, len(clock.epochs) - 1),
        "validations": len(clock.validations),
        "validation_s": sum(clock.validations) / max(1, len(clock.validations)),
    }


def fit_versions(args: argparse.Namespace, output: Path) -> list[str]:
    """Run :func:`user_fit` once per ``--fit-versions`` checkout, each in its own process; report sections."""
    rows = []
    for source in args.fit_versions:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source.resolve()), os.environ.get("PYTHONPATH", "")])}
        request = json.dumps({"data": args.fit_data, "epochs": args.fit_epochs, "threads": args.threads})
        done = subprocess.run(
            [sys.executable, __file__, "--fit-child", request], env=env, capture_output=True, text=True, check=False
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            rows.append({"source": str(source), "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(lines[-1]))
        pd.DataFrame(rows).to_csv(output / "fit.csv", index=False)
    table = pd.DataFrame(rows)
    first = table.s_per_epoch.iloc[0] if "s_per_epoch" in table and pd.notna(table.s_per_epoch.iloc[0]) else np.nan
    columns = ["version", "source", "epochs", "fit_s", "s_per_epoch", "first_epoch_s", "later_epochs_s"]
    cells = [
        [
            *(str(row.get(c, "—")) for c in columns[:3]),
            *(f"{row.get(c, np.nan):.1f}" for c in columns[3:]),
            f"{row.get('validations', '—')} × {row.get('validation_s', np.nan):.1f}",
            f"{first / row.get('s_per_epoch', np.nan):.2f}×",
        ]
        for row in rows
    ]
    return [
        f"## anomalib's default Engine, {args.fit_epochs} epochs\n\nData: `{json.dumps(args.fit_data)}` (its own "
        f"batch size and workers); {args.threads} torch thread(s); each version in a fresh process. An epoch's time "
        "includes the validation (and map-statistics refit) that follows it, when there is one. Speed-up: the "
        "first version's seconds per epoch over this one's.",
        common.markdown_table([*columns, "validations × s", "speed-up"], cells),
    ]


def best_seconds(run: Callable[[], Any], repeats: int = REPEATS, warm_up: Callable[[], Any] | None = None) -> float:
    """Wall seconds of ``run()``, the best of ``repeats`` calls after one call of ``warm_up`` (default: ``run``)."""
    (warm_up or run)()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _each(forward: Callable[[Any], Any], inputs: Iterable[Any]) -> None:
    for item in inputs:
        forward(item)


@torch.inference_mode()
def teacher_calls(args: argparse.Namespace, output: Path) -> list[str]:
    """Milliseconds per image of the default teacher in calls of each ``--teacher-calls`` number of images (its timm
    feature extractor), and of the package's ``Teacher``, which splits a CPU batch into calls of at most
    ``CPU_CHUNK_PIXELS`` input pixels; at each ``--image-size``, over as many images as the largest call."""
    # Imported here: --fit-versions runs old versions of the package, which lack these.
    from anomalib_tdad.models.tdad.teacher import CPU_CHUNK_PIXELS, Teacher, images_per_call

    torch.set_num_threads(args.threads)
    teacher = Teacher(common.TEACHER, common.TDAD_LAYERS).eval()
    count = max(args.teacher_calls)
    rows = []
    for size in args.image_size:
        images = torch.randn(count, 3, size, size).contiguous(memory_format=torch.channels_last)
        for calls in args.teacher_calls:
            seconds = best_seconds(partial(_each, teacher.feature_extractor, images.split(calls)))
            rows.append({"image_size": size, "images_per_call": str(calls), "ms_per_image": 1000 * seconds / count})
        seconds = best_seconds(partial(teacher, images))
        rows.append({"image_size": size, "images_per_call": "package Teacher", "ms_per_image": 1000 * seconds / count})
    table = pd.DataFrame(rows)
    table.to_csv(output / "teacher_calls.csv", index=False)
    order = list(dict.fromkeys(table.images_per_call))
    pivot = table.pivot(index="images_per_call", columns="image_size", values="ms_per_image").reindex(order)
    cells = [[calls, *(f"{ms:.1f}" for ms in row)] for calls, row in pivot.iterrows()]
    chunks = ", ".join(f"{images_per_call(size, size)} at {size} px" for size in pivot.columns)
    return [
        f"Teacher `{common.TEACHER}` ({', '.join(common.TDAD_LAYERS)}), {count} random images per pass, "
        f"{args.threads} torch thread(s), `torch.inference_mode`, `channels_last`; each cell the best of {REPEATS} "
        f"passes. *package Teacher*: the package's teacher on the whole batch, which it splits into calls of at most "
        f"`CPU_CHUNK_PIXELS` = {CPU_CHUNK_PIXELS} input pixels ({chunks} images).",
        "## Milliseconds per image, by images per call\n\n"
        + common.markdown_table(["images per call", *(f"{size} px" for size in pivot.columns)], cells),
    ]


# ---------------------------------------------------------------------------------------------- models


class RandomBankPatchcore(Patchcore):
    """PatchCore whose memory bank is drawn at random, as large as its coreset ratio makes it.

    PatchCore's inference cost depends only on the size of its bank, not on which patches are in it; the
    greedy coreset selection that picks them at ratio 0.1 takes 25 min at 128 px on 2 CPU threads and more than a
    day at 256 px (benchmarks/README.md). So this subclass replaces the selection (its ``fit`` hook, which
    anomalib's memory-bank models call after the training epoch) by a random draw, to time inference at
    anomalib's default setting; its training time is not reported.
    """

    def fit(self) -> None:
        """Keep a random ``coreset_sampling_ratio`` share of the collected patch embeddings as the memory bank."""
        bank = torch.vstack(self.model.embedding_store)
        self.model.embedding_store.clear()
        size = max(1, int(len(bank) * self.coreset_sampling_ratio))
        self.model.memory_bank = bank[torch.randperm(len(bank))[:size]]


def patchcore_default_bank(image_size: int) -> AnomalibModule:
    """:class:`RandomBankPatchcore` at anomalib's default coreset ratio."""
    return common.build_model("patchcore", image_size, ANOMALIB_CORESET_RATIO, model_class=RandomBankPatchcore)


def build_speed_model(key: str, args: argparse.Namespace) -> nn.Module:
    """The model ``key`` at the benchmark's image size."""
    if key == "patchcore-default-bank":
        return patchcore_default_bank(args.image_size)
    return common.build_model(key, args.image_size, args.coreset_ratio)


# ---------------------------------------------------------------------------------------------- phases


def test_batches(data: common.DataConfig, count: int, image_size: int, batch_size: int) -> list[torch.Tensor]:
    """``count`` test images (repeated if there are fewer), resized to ``image_size``, in batches."""
    dataset = common.make_datamodule(data).test_data
    images = []
    for index in range(count):
        image = dataset[index % len(dataset)].image
        images.append(
            F.interpolate(image[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
        )
    return list(torch.stack(images).split(batch_size))


@torch.inference_mode()
def tdad_parts(model: AnomalibModule, batches: Sequence[torch.Tensor], repeats: int = REPEATS) -> dict[str, float]:
    """Milliseconds per image of each part of TDAD's eager inference, each the best of ``repeats`` passes."""
    net = model.model
    pre = [model.pre_processor(batch) for batch in batches]
    teacher = [net.teacher(images) for images in pre]
    student = [net.student(features) for features in teacher]
    size = tuple(pre[0].shape[-2:])
    parts: dict[str, tuple[Callable[..., Any], list[Any]]] = {
        "pre-processing": (model.pre_processor, list(batches)),
        "teacher": (net.teacher, pre),
        "student": (net.student, teacher),
        "map (distances, statistics, upsampling, blur)": (
            lambda pair: net.anomaly_map_generator(*pair, size),
            list(zip(teacher, student, strict=True)),
        ),
        "whole model (with post-processing)": (model, list(batches)),
    }
    images = sum(len(batch) for batch in batches)
    times = {}
    for name, (forward, inputs) in parts.items():
        seconds = best_seconds(partial(_each, forward, inputs), repeats, warm_up=partial(forward, inputs[0]))
        times[name] = 1000 * seconds / images
    return times


def parts_section(parts: dict[str, float]) -> str:
    """Markdown table of :func:`tdad_parts`, each part also as a share of the teacher's time."""
    teacher = parts["teacher"]
    cells = [[name, f"{ms:.2f}", f"{ms / teacher:.2f}×"] for name, ms in parts.items()]
    return "## TDAD's eager inference by part\n\n" + common.markdown_table(["part", "ms per image", "÷ teacher"], cells)


def measure(
    label: str,
    build: Callable[[], nn.Module],
    args: argparse.Namespace,
    data: common.DataConfig,
    batches: list[torch.Tensor],
    epochs: int | None,
) -> dict[str, Any]:
    """Train (if ``epochs``), then time eager and OpenVINO inference of one model.

    Memory of a torch phase is its peak RSS minus the RSS just before the model was built
    (``base_rss_mb``), so libraries loaded earlier and models measured before do not count; OpenVINO's
    is counted from after the torch model is freed.
    """
    seed_everything(0)
    release_memory()
    base = rss_mb()
    row: dict[str, Any] = {"model": label, "base_rss_mb": base}
    model = build()
    if epochs:
        with PeakRSS() as memory:
            row["train_s_per_epoch"] = train_seconds(model, data, epochs)
        row |= {
            "epochs": epochs,
            "train_images": len(common.make_datamodule(data).train_data),
            "train_mem_mb": memory.peak - base,
        }
        row["train_ms_per_image"] = 1000 * row["train_s_per_epoch"] / row["train_images"]
    model.eval()
    with PeakRSS() as memory:
        row["eager_images_per_s"] = images_per_second(model, batches)
    if label == "TDAD":
        row["parts"] = tdad_parts(model, batches)
    row["eager_mem_mb"] = memory.peak - base
    if not args.no_openvino:
        try:
            with tempfile.TemporaryDirectory() as folder:
                exported = {"openvino": to_openvino(model, f"{folder}/f32", batches[0])}
                if not args.no_int8:  # calibration batches as large as the f32 graph's batch, if it fixed one
                    batch = fixed_batch(exported["openvino"]) or data.batch_size
                    calibration = dataclasses.replace(data, batch_size=batch)
                    exported["openvino_int8"] = to_openvino(model, f"{folder}/int8", batches[0], calibration)
                del model
                for name, ir in exported.items():
                    release_memory()
                    with PeakRSS() as memory:  # starts after the torch model is freed: counts the compiled model
                        forward = openvino_forward(ir, args.threads)
                        row[f"{name}_images_per_s"] = images_per_second(forward, batches)
                    row[f"{name}_mem_mb"] = memory.peak - memory.start
                    del forward
        except Exception as error:  # noqa: BLE001 - report the failure, keep the other numbers
            row["error"] = f"OpenVINO: {error!r}"[:300]
    return row


def warm_up(args: argparse.Namespace, data: common.DataConfig, batches: list[torch.Tensor]) -> None:
    """Load what the first measured model would otherwise pay for (training path, OpenVINO's CPU plugin)."""
    one_batch = common.DataConfig(
        data.root, data.category, data.batch_size, data.num_workers, train_limit=data.batch_size
    )
    model = common.build_model("stfpm", args.image_size)
    train_seconds(model, one_batch, 1)
    images_per_second(model.eval(), batches[:1])
    if not args.no_openvino:
        openvino_forward(to_openvino(nn.Conv2d(3, 3, 3), "", batches[0]), args.threads)(batches[0])
    del model


def stream(args: argparse.Namespace, data: common.DataConfig, output: Path) -> pd.DataFrame:
    """Run TDAD over ``--stream-images`` images read from disk; RSS after each batch.

    The model is untrained: its memory and compute are those of a trained one.
    """
    from anomalib.data import PredictDataset
    from torch.utils.data import DataLoader
    from torchvision.transforms.v2 import Resize

    seed_everything(0)
    model = common.build_model("tdad", args.image_size).eval()
    paths = list(common.make_datamodule(data).test_data.samples.image_path)
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.stream_images):  # hard links: N files on disk for the price of one
            source, target = paths[index % len(paths)], Path(folder) / f"{index:06d}.png"
            try:
                os.link(source, target)
            except OSError:
                shutil.copy(source, target)
        dataset = PredictDataset(folder, transform=Resize((args.image_size, args.image_size)))
        loader = DataLoader(
            dataset, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=dataset.collate_fn
        )
        release_memory()
        rows, done = [{"images": 0, "rss_mb": rss_mb()}], 0
        with torch.inference_mode():
            for batch in tqdm(loader, desc="stream", unit="batch", dynamic_ncols=True):
                model(batch.image)
                done += len(batch.image)
                rows.append({"images": done, "rss_mb": rss_mb()})
    trace = pd.DataFrame(rows)
    trace.to_csv(output / "stream.csv", index=False)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(trace.images, trace.rss_mb)
    ax.set(
        xlabel="images processed",
        ylabel="RSS (MB)",
        title=f"TDAD streaming {args.stream_images} images",
        ylim=(0, trace.rss_mb.max() * 1.1),
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output / "stream.png", dpi=110)
    plt.close(fig)
    return trace


def stream_section(trace: pd.DataFrame) -> str:
    """Markdown verdict of the streaming trace: RSS after the first tenth of the images against the end."""
    warm = trace[trace.images >= trace.images.max() / 10].iloc[0]
    half = trace[trace.images >= trace.images.max() / 2]
    slope = np.polyfit(half.images, half.rss_mb, 1)[0] * 1000 if len(half) > 1 else float("nan")
    growth = trace.rss_mb.iloc[-1] - warm.rss_mb
    verdict = "stays flat" if abs(growth) < FLAT_MB else "GROWS"
    return (
        f"## Streaming\n\nTDAD over {int(trace.images.max())} images read from disk in batches: RSS "
        f"{trace.rss_mb.iloc[0]:.0f} MB before, {warm.rss_mb:.0f} MB after {int(warm.images)} images, peak "
        f"{trace.rss_mb.max():.0f} MB, {trace.rss_mb.iloc[-1]:.0f} MB at the end: {growth:+.0f} MB after the first "
        f"tenth, slope over the second half {slope:+.1f} MB per 1000 images. Memory {verdict} (criterion: "
        f"|growth| < {FLAT_MB} MB).\n\n![stream](stream.png)"
    )


def ratio_table(rows: pd.DataFrame) -> str:
    """TDAD's cost divided by each peer's (>1: TDAD costs more), per measured quantity."""
    quantities = {  # label: (column, invert) — throughputs become time per image
        "train s/epoch": ("train_s_per_epoch", False),
        "eager time/image": ("eager_images_per_s", True),
        "OpenVINO time/image": ("openvino_images_per_s", True),
        "OpenVINO INT8 time/image": ("openvino_int8_images_per_s", True),
        "train memory": ("train_mem_mb", False),
        "eager memory": ("eager_mem_mb", False),
        "OpenVINO memory": ("openvino_mem_mb", False),
        "OpenVINO INT8 memory": ("openvino_int8_mem_mb", False),
    }
    table = rows.set_index("model")
    if "TDAD" not in table.index:
        return ""
    out = []
    for peer in table.index.drop("TDAD"):
        cells = []
        for column, invert in quantities.values():
            tdad, other = table.loc["TDAD"].get(column, np.nan), table.loc[peer].get(column, np.nan)
            value = (
                (other / tdad if invert else tdad / other)
                if pd.notna(tdad) and pd.notna(other) and other and tdad
                else np.nan
            )
            cells.append("—" if pd.isna(value) else f"{value:.2f}×")
        out.append([f"TDAD / {peer}", *cells])
    return common.markdown_table(["ratio", *quantities], out)


def int8_section(rows: pd.DataFrame) -> str:
    """Markdown: each model's INT8 IR throughput over its f32 IR's (> 1: INT8 is faster); empty without INT8."""
    if "openvino_int8_images_per_s" not in rows or rows.openvino_int8_images_per_s.isna().all():
        return ""
    cells = [
        [row.model, f"{row.openvino_int8_images_per_s / row.openvino_images_per_s:.2f}×"]
        for _, row in rows.iterrows()
        if pd.notna(row.openvino_int8_images_per_s) and pd.notna(row.openvino_images_per_s)
    ]
    return (
        "## OpenVINO INT8 against f32\n\nImages per second of each model's INT8 IR (NNCF post-training "
        "quantization; TDAD: its map head kept in float32) over its f32 IR's, both compiled with "
        "`INFERENCE_PRECISION_HINT=f32` (the precision of the ops left in float).\n\n"
        + common.markdown_table(["model", "INT8 speed-up"], cells)
    )


def measure_size(args: argparse.Namespace, output: Path) -> tuple[pd.DataFrame, list[str]]:
    """Every model at ``args.image_size``: the results table and the report sections."""
    torch.set_num_threads(args.threads)
    data = common.DataConfig(args.root, args.category, args.batch_size, args.num_workers, args.train_images)
    batches = test_batches(data, args.infer_images, args.image_size, args.batch_size)
    jobs: list[tuple[str, Callable[[], nn.Module], int | None]] = [
        (
            DEFAULT_BANK_LABEL if key == "patchcore-default-bank" else common.LABELS[key],
            partial(build_speed_model, key, args),
            1 if key.startswith(tuple(common.MEMORY_BANK)) else args.epochs,
        )
        for key in args.models
    ]
    jobs.append((TEACHER_LABEL, partial(TeacherOnly, args.image_size), None))
    warm_up(args, data, batches)
    rows = []
    for label, build, epochs in tqdm(jobs, desc="speed", unit="model", dynamic_ncols=True):
        row = measure(label, build, args, data, batches, epochs)
        if label == DEFAULT_BANK_LABEL:  # its bank was drawn at random: only inference is comparable
            row = {key: value for key, value in row.items() if not key.startswith("train")}
        rows.append(row)
        pd.DataFrame(rows).drop(columns="parts", errors="ignore").to_csv(
            output / f"speed-{args.image_size}.csv", index=False
        )
    results = pd.DataFrame(rows).reindex(columns=["model", "epochs", "train_images", *COLUMNS, "error"])

    cells = [
        [row.model, *("—" if pd.isna(row[c]) else f"{row[c]:.4g}" for c in COLUMNS)] for _, row in results.iterrows()
    ]
    train_images = int(results.train_images.max()) if results.train_images.notna().any() else 0
    sections = [
        (
            f"Dataset `{args.root / args.category}`: {train_images} training images, {sum(map(len, batches))} test "
            f"images timed for inference, {args.image_size}×{args.image_size} px, batch size {args.batch_size}, "
            f"{args.threads} torch/OpenVINO thread(s), {args.num_workers} data loader workers. Teacher "
            f"`{common.TEACHER}` for every model (TDAD: {', '.join(common.TDAD_LAYERS)}; STFPM: "
            f"{', '.join(common.PEER_LAYERS)}; PatchCore: {', '.join(common.PATCHCORE_LAYERS)}); "
            f"PatchCore coreset ratio {args.coreset_ratio}."
        ),
        "## Absolute numbers (this device and thread count only)\n\n"
        + common.markdown_table(["model", *COLUMNS], cells),
        METHOD_NOTE,
        "## Ratios (TDAD cost ÷ peer cost; > 1 means TDAD costs more)\n\n" + ratio_table(results),
        int8_section(results),
        *(parts_section(row["parts"]) for row in rows if "parts" in row),
    ]
    if args.stream_images and args.image_size == args.stream_size:
        sections.append(stream_section(stream(args, data, output)))
    failed = results[results.error.fillna("") != ""]
    if len(failed):
        sections.append(
            "**Failures:**\n\n" + common.markdown_table(["model", "error"], failed[["model", "error"]].to_numpy())
        )
    return results, [section for section in sections if section]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=common.DEFAULT_ROOT, help="dataset root in MVTec AD layout")
    parser.add_argument("--category", default=common.DEFAULT_CATEGORY, help="category folder under --root")
    parser.add_argument(
        "--image-size", type=int, nargs="+", default=[256], help="square input size(s) of every model, in turn"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="train and inference batch size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and OpenVINO CPU threads")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--train-images", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs timed for TDAD and STFPM (PatchCore: always 1)")
    parser.add_argument(
        "--infer-images", type=int, default=64, help="test images timed for inference (repeated if fewer)"
    )
    parser.add_argument(
        "--coreset-ratio", type=float, default=0.001, help="PatchCore coreset sampling ratio (see benchmarks/README.md)"
    )
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, help="models besides the teacher alone")
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO exports and timing")
    parser.add_argument(
        "--no-int8", action="store_true", help="skip the INT8 OpenVINO export (NNCF: pip install '.[int8]')"
    )
    parser.add_argument(
        "--stream-images",
        type=int,
        default=0,
        help="also stream TDAD over this many images at the first --image-size and track RSS (0: skip)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output folder (default: results/benchmarks/<timestamp>-speed)"
    )
    parser.add_argument(
        "--fit-data", type=json.loads, default=None, help="time anomalib's default fit on this datamodule (JSON)"
    )
    parser.add_argument("--fit-epochs", type=int, default=10, help="epochs of each --fit-data run")
    parser.add_argument(
        "--fit-versions", type=Path, nargs="+", default=[Path()], help="source checkouts timed with --fit-data"
    )
    parser.add_argument(
        "--teacher-calls",
        type=int,
        nargs="+",
        default=None,
        help="time the teacher alone in calls of these many images",
    )
    parser.add_argument("--fit-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.teacher_calls and min(args.teacher_calls) < 1:
        parser.error("--teacher-calls: every number of images per call must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every model, write the CSV and the report; returns 1 if a measurement failed."""
    args = parse_args(argv)
    if args.fit_child:  # one --fit-versions run, in its own process
        common.quiet()
        print(json.dumps(user_fit(**json.loads(args.fit_child))))
        return 0
    output = common.setup_run(args, "speed")
    if args.teacher_calls:
        common.write_report(output / "report.md", "Teacher cost by images per call", teacher_calls(args, output))
        print(f"Wrote {output / 'report.md'}")
        return 0
    if args.fit_data:
        title = "TDAD: time of anomalib's default fit, version against version"
        common.write_report(output / "report.md", title, fit_versions(args, output))
        print(f"Wrote {output / 'report.md'}")
        return 1 if "error" in pd.read_csv(output / "fit.csv") else 0
    if not (args.no_openvino or args.no_int8):
        try:
            check_nncf("int8_ptq")
        except ModuleNotFoundError as error:
            print(f"speed: {error} (or pass --no-int8)", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    tables, sections = [], []
    for size in args.image_size:
        sized = argparse.Namespace(**{**vars(args), "image_size": size, "stream_size": args.image_size[0]})
        results, size_sections = measure_size(sized, output)
        tables.append(results.assign(image_size=size))
        heading = [f"## At {size} × {size} px"] if len(args.image_size) > 1 else []
        sections += heading + size_sections
    results = pd.concat(tables, ignore_index=True)
    results.to_csv(output / "speed.csv", index=False)
    failed = results[results.error.fillna("") != ""]
    title = f"TDAD cost against PatchCore, STFPM and the teacher alone ({args.category})"
    common.write_report(output / "report.md", title, sections)
    print(f"Wrote {output / 'report.md'}")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
