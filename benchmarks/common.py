"""Code shared by the benchmark scripts (``benchmark.py``, ``speed.py``): the benchmark components, data, reports.

- components passed to every benchmark model: :func:`make_evaluator` (anomalib's ``Evaluator`` with image and
  pixel AUROC, PRO, and per defect type :class:`DefectTypeAUROC` and :class:`DefectTypeAUPRO`) and
  :class:`MinMaxPostProcessor`;
- data: :func:`limit_datamodule` (fixed subsets for quick checks); ``speed.py``'s models on one teacher
  (:func:`build_model`) and MVTec-layout data (:class:`DataConfig`);
- reports: run information (command, commit, device, threads, versions), Markdown tables, bar plots, heatmaps.

Everything reuses anomalib through its public classes (subclasses, constructor arguments); nothing of it is
patched.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812

warnings.filterwarnings("ignore")  # before anomalib's imports, which warn about optional components

from anomalib.data import MVTecAD
from anomalib.data.utils import ValSplitMode
from anomalib.metrics import AUPRO, AUROC, Evaluator
from anomalib.models import AnomalibModule, Padim, Patchcore, Stfpm
from anomalib.post_processing import PostProcessor
from lightning.pytorch.trainer.states import TrainerFn
from torchvision.transforms.v2 import Resize

from anomalib_tdad import Tdad
from anomalib_tdad.models.tdad.teacher import select_layers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO.parent / "shared" / "data"
DEFAULT_CATEGORY = "magnetic_tile"

TEACHER = "tf_efficientnet_lite0"
TDAD_LAYERS = select_layers(TEACHER, None)[0]  # TDAD's and RD's: the package default (the stride-8/16/32 levels)
PEER_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]  # strides 4, 8, 16 like a ResNet's layer1-3: STFPM and PaDiM
PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]  # strides 8 and 16, as PatchCore's layer2 + layer3
PADIM_FEATURES = 100  # of the 176 teacher channels (PaDiM keeps 100 of resnet18's 448)

RD_LABEL = "RD (TDAD λs=λd=0, same teacher)"
RD_NOTE = (
    f"*{RD_LABEL}* is TDAD with λ_SCD = λ_DMD = 0, plain reverse distillation on the same teacher: it stands "
    "in for anomalib's `ReverseDistillation`, whose decoder exists only for ResNet backbones."
)
LABELS = {"tdad": "TDAD", "rd": RD_LABEL, "patchcore": "PatchCore", "stfpm": "STFPM", "padim": "PaDiM"}
CLASS_LABELS = {"Patchcore": "PatchCore", "Stfpm": "STFPM", "Padim": "PaDiM"}
MEMORY_BANK = {"patchcore", "padim"}  # one fitting epoch, no gradient training
METRICS = {"image_AUROC": "image AUROC", "pixel_AUROC": "pixel AUROC", "pixel_AUPRO": "PRO"}
# results.csv columns of one defect type (its images + the good ones): its pixel AUROC and its PRO, by metric key
TYPE_PREFIXES = {"AUROC": "pixel AUROC · ", "AUPRO": "PRO · "}
METRICS_NOTE = (
    "PRO is anomalib's AUPRO (FPR limit 0.3). Scores and maps are min-max scaled over the validation set "
    "(anomalib's default for MVTecAD and Kolektor: the test set) before the metrics, not centred on the threshold "
    "and clamped as anomalib does by default: that clamp ties scores and shifts AUROC."
)


def quiet() -> None:
    """Silence the warnings and info lines anomalib and Lightning print for every run."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    packages = {"lightning", "lightning_fabric", "pytorch_lightning", "anomalib", "timm", "onnxscript"}
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in packages]
    for name in {*packages, *names}:
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------- models


def defect_type(image_path: str | Path) -> str:
    """The defect type of a test image: the name of its folder (MVTec AD layout: ``test/<type>/<image>``)."""
    return Path(image_path).parent.name


def defect_types(dataset: Any, good: str = "good") -> list[str]:
    """The defect types of an anomalib test dataset, sorted; none unless its normal images lie in ``good/``.

    Only MVTec-AD-layout sets (``test/good``, ``test/<type>``) name their defect types by folder; others
    (Kolektor's ``kosNN`` parts) mix normal and defective images in a folder and get no per-type metrics.
    """
    folders = {defect_type(path) for path in dataset.samples.image_path}
    return sorted(folders - {good}) if good in folders else []


def images_of_types(batch: Any, fields: Sequence[str], types: set[str]) -> SimpleNamespace | None:
    """The ``fields`` of the batch's images whose folder (:func:`defect_type`) is one of ``types``; ``None`` if none."""
    paths = getattr(batch, "image_path", None) or []
    chosen = [index for index, path in enumerate(paths) if defect_type(path) in types]
    if not chosen:
        return None
    fields_of = {}
    for name in fields:
        value = getattr(batch, name, None)
        fields_of[name] = None if value is None else value[torch.as_tensor(chosen, device=value.device)]
    return SimpleNamespace(**fields_of)


class _OfDefectType:
    """An anomalib pixel metric over the test images of one defect type together with the normal (``good``) ones.

    Images are grouped by their folder, the parent of ``image_path`` (MVTec AD layout: ``test/<type>/``): the
    metric keeps the batch's images of type ``defect_type`` or ``good`` and passes those to the anomalib metric it
    is mixed into. It logs as ``pixel_<metric>[<type>]``. One instance per defect type goes into an ``Evaluator``.
    """

    metric: str = ""

    def __init__(self, defect_type: str, good: str = "good", **kwargs: Any) -> None:
        kwargs.setdefault("fields", ["anomaly_map", "gt_mask"])
        kwargs.setdefault("prefix", "pixel_")
        super().__init__(**kwargs)
        self.types = {defect_type, good}
        self.name = f"{kwargs['prefix']}{self.metric}[{defect_type}]"

    def update(self, batch: Any, *args: Any, **kwargs: Any) -> None:
        """Update with the images of ``defect_type`` and ``good`` in ``batch`` (skipped when it has none)."""
        if (chosen := images_of_types(batch, self.fields, self.types)) is not None:
            super().update(chosen, *args, **kwargs)


PRO_FPR_LIMIT = 0.3  # anomalib's AUPRO default, set explicitly: every PRO of the benchmarks integrates to it


class DefectTypeAUROC(_OfDefectType, AUROC):
    """anomalib's pixel AUROC of one defect type's test images and the good ones (see :class:`_OfDefectType`)."""

    metric = "AUROC"


class DefectTypeAUPRO(_OfDefectType, AUPRO):
    """anomalib's PRO (AUPRO, FPR limit 0.3) of one defect type's test images and the good ones: each region of that
    type weighs the same, and the false-positive rate counts the normal pixels of those images."""

    metric = "AUPRO"


class RawScoreAUROC(AUROC):
    """anomalib's AUROC of unscaled scores or maps: those of a validation, which the post-processor does not scale.

    torchmetrics takes predictions outside [0, 1] for logits and applies a sigmoid, which in float32 is exactly 1
    above about 16.6: the highest scores tie and AUROC changes (TDAD's standardized maps reach such values; on
    KolektorSDD a validation read 0.870 where the test of the same model, on min-max scaled scores, read 0.885).
    Here the predictions are first mapped into [0.05, 0.95] by ``0.5 + sign(x) log(1 + |x|) / 200``, strictly
    increasing for every finite float32, so no sigmoid is applied and AUROC is that of the raw order.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = f"{kwargs.get('prefix', '')}AUROC"  # logged under AUROC's name

    def update(self, batch: Any, *args: Any, **kwargs: Any) -> None:
        """Update with the batch's predictions (the first of ``fields``) mapped into [0, 1], order kept."""
        fields = {field: getattr(batch, field, None) for field in self.fields}
        preds = fields[self.fields[0]]
        if preds is not None:
            fields[self.fields[0]] = 0.5 + torch.sign(preds) * torch.log1p(preds.abs()) / 200
        super().update(SimpleNamespace(**fields), *args, **kwargs)


def main_metrics(raw: bool = False) -> list[AUROC | AUPRO]:
    """Image AUROC, pixel AUROC and PRO (anomalib's AUPRO, FPR limit 0.3), fresh; ``raw``: of unscaled scores and
    maps (:class:`RawScoreAUROC`; AUPRO applies no sigmoid)."""
    auroc = RawScoreAUROC if raw else AUROC
    return [
        auroc(fields=["pred_score", "gt_label"], prefix="image_"),
        auroc(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=PRO_FPR_LIMIT),
    ]


def make_evaluator(types: Sequence[str] = (), validation: bool = False) -> Evaluator:
    """Test metrics of every benchmark: :func:`main_metrics` and the pixel AUROC and PRO of each of ``types``
    (:class:`DefectTypeAUROC`, :class:`DefectTypeAUPRO`); with ``validation``, the main metrics of the unscaled
    validation outputs too."""
    return Evaluator(
        val_metrics=main_metrics(raw=True) if validation else None,
        test_metrics=[
            *main_metrics(),
            *(DefectTypeAUROC(kind, strict=False) for kind in types),
            *(DefectTypeAUPRO(kind, strict=False, fpr_limit=PRO_FPR_LIMIT) for kind in types),
        ],
    )


class MinMaxPostProcessor(PostProcessor):
    """anomalib's post-processor with plain min-max scaling of scores and maps.

    anomalib 2.7 maps ``x`` to ``(x - threshold) / (max - min) + 0.5`` clamped to [0, 1]: with the threshold
    off-centre, every score more than half a range from it becomes 0 or 1, the ties change AUROC (measured:
    PatchCore image AUROC 0.714 instead of its raw 0.722). Scaling to ``(x - min) / (max - min)`` keeps the
    order, stays in [0, 1] (so torchmetrics applies no sigmoid) and moves the threshold along with it.
    """

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None, norm_min: torch.Tensor, norm_max: torch.Tensor, threshold: torch.Tensor
    ) -> torch.Tensor | None:
        del threshold
        if preds is None:
            return None
        value_range = norm_max - norm_min
        scaled = ((preds - norm_min) / torch.where(value_range > 0, value_range, torch.ones_like(value_range))).clamp(
            0, 1
        )
        return torch.where(torch.isnan(norm_min) | torch.isnan(norm_max), preds, scaled)

    @property
    def normalized_image_threshold(self) -> torch.Tensor:
        """The image threshold on the min-max scale."""
        return self._normalize(self.image_threshold, self.image_min, self.image_max, self.image_threshold)

    @property
    def normalized_pixel_threshold(self) -> torch.Tensor:
        """The pixel threshold on the min-max scale."""
        return self._normalize(self.pixel_threshold, self.pixel_min, self.pixel_max, self.pixel_threshold)


def build_model(
    kind: str,
    image_size: int,
    coreset_ratio: float = 0.001,
    model_class: type[AnomalibModule] | None = None,
) -> AnomalibModule:
    """One of ``LABELS``' models on the Lite0 teacher at ``image_size``, with the benchmark metrics.

    ``rd`` is TDAD with ``lambda_scd = lambda_dmd = 0``: plain reverse distillation on the same teacher
    (anomalib's ``ReverseDistillation`` has decoders for ResNets only).
    ``model_class``: a subclass of the model's class to build instead (``speed.py``'s random-bank PatchCore).
    """
    teacher = {"backbone": TEACHER, "layers": PEER_LAYERS}
    models: dict[str, tuple[type[AnomalibModule], dict[str, Any]]] = {
        "tdad": (Tdad, {"backbone": TEACHER}),
        "rd": (Tdad, {"backbone": TEACHER, "lambda_scd": 0.0, "lambda_dmd": 0.0}),
        "patchcore": (
            Patchcore,
            {"backbone": TEACHER, "layers": PATCHCORE_LAYERS, "coreset_sampling_ratio": coreset_ratio},
        ),
        "stfpm": (Stfpm, teacher),
        "padim": (Padim, {**teacher, "n_features": PADIM_FEATURES}),
    }
    if kind not in models:
        msg = f"Unknown model {kind!r}; choose from {sorted(models)}."
        raise ValueError(msg)
    cls, kwargs = models[kind]
    cls = model_class or cls
    return cls(
        **kwargs,
        pre_processor=cls.configure_pre_processor(image_size=(image_size, image_size)),
        post_processor=MinMaxPostProcessor(),
        evaluator=make_evaluator(),
        visualizer=False,
    )


def model_label(class_path: str, init_args: dict[str, Any]) -> str:
    """Table label of a benchmark-config model (``class_path`` and its ``init_args``)."""
    name = class_path.rsplit(".", 1)[-1]
    if name == "Tdad":
        plain = float(init_args.get("lambda_scd", 1.0)) == 0 and float(init_args.get("lambda_dmd", 1.0)) == 0
        return RD_LABEL if plain else "TDAD"
    return CLASS_LABELS.get(name, name)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Which images a benchmark uses; the limits pick a fixed random subset (0: all)."""

    root: Path
    category: str
    batch_size: int = 8
    num_workers: int = 0
    train_limit: int = 0
    test_limit: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataConfig:
        """The options that :func:`add_data_args` added to a parser."""
        return cls(args.root, args.category, args.batch_size, args.num_workers, args.train_limit, args.test_limit)


def _per_label_subset(labels: np.ndarray, limit: int, rng: np.random.Generator) -> list[int]:
    """About ``limit`` indices, drawn per label in proportion to its share, at least one of each label."""
    chosen: list[int] = []
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        count = max(1, round(limit * len(indices) / len(labels)))
        chosen += rng.choice(indices, size=min(count, len(indices)), replace=False).tolist()
    return sorted(chosen)


def make_datamodule(data: DataConfig, val_size: int | None = None) -> MVTecAD:
    """anomalib's ``MVTecAD`` on ``root/category``, set up, cut to the limits.

    The test set doubles as validation set (anomalib's default); validation only fits the post-processor's
    threshold and scaling. ``val_size``: validation images resized to that square size by the datamodule (e.g. to
    calibrate an INT8 export fixed to that input size outside a trainer, which would otherwise resize them).
    """
    folder = Path(data.root) / data.category
    if not (folder / "train").is_dir():
        msg = f"No MVTec AD layout dataset at {folder} (expected train/good, test/, ground_truth/ in it)."
        raise FileNotFoundError(msg)
    datamodule = MVTecAD(
        root=data.root,
        category=data.category,
        train_batch_size=data.batch_size,
        eval_batch_size=data.batch_size,
        num_workers=data.num_workers,
        val_augmentations=Resize((val_size, val_size), antialias=True) if val_size else None,
    )
    return limit_datamodule(datamodule, data.train_limit, data.test_limit)


def limit_datamodule(datamodule: Any, train_limit: int = 0, test_limit: int = 0) -> Any:
    """Set up an anomalib datamodule and cut it to a fixed random subset (0: all images); returns it.

    ``train_limit`` random training images; about ``test_limit`` test images, drawn per label in proportion,
    at least one of each. The subsets depend on nothing but the limits (the same images for every model and
    seed). A validation set that is the test set (anomalib's default) becomes the cut test set.
    """
    datamodule.setup(TrainerFn.FITTING)  # marks it set up, so the trainer keeps the subsets made below
    rng = np.random.default_rng(0)
    if 0 < train_limit < len(datamodule.train_data):
        indices = rng.choice(len(datamodule.train_data), train_limit, replace=False)
        datamodule.train_data = datamodule.train_data.subsample(sorted(indices.tolist()))
    if 0 < test_limit < len(datamodule.test_data):
        labels = datamodule.test_data.samples.label_index.to_numpy()
        datamodule.test_data = datamodule.test_data.subsample(_per_label_subset(labels, test_limit, rng))
        if datamodule.val_split_mode == ValSplitMode.SAME_AS_TEST:
            datamodule.val_data = datamodule.test_data.subsample(range(len(datamodule.test_data)))
    return datamodule


# ------------------------------------------------------------------------------------------------ runs


def setup_run(args: argparse.Namespace, script: str) -> Path:
    """Apply ``--threads``, quiet the libraries, create and return the output folder."""
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    output = args.output or REPO / "results" / "benchmarks" / f"{datetime.now():%Y%m%d-%H%M%S}-{script}"
    output.mkdir(parents=True, exist_ok=True)
    return output


# --------------------------------------------------------------------------------------------- reports


def device_info() -> str:
    """The machine in words: GPU or CPU model and logical cores."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({os.cpu_count()} logical cores)"


def thread_info() -> str:
    """torch's CPU thread count and the OpenMP setting it came from."""
    return f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def versions() -> str:
    """Python and the versions of the packages a benchmark's numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "torchvision", "lightning", "anomalib", "timm", "anomalib-tdad"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def git_commit() -> str:
    """Short commit of the repository, with ``+dirty`` when tracked files were changed."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def run_info(command: Sequence[str] | None = None) -> dict[str, str]:
    """Command line (default: ``sys.argv``), date, commit, device, threads and package versions, for the head of
    every report."""
    return {
        "Command": "`python " + shlex.join(sys.argv if command is None else command) + "`",
        "Date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "Git commit": git_commit(),
        "Device": device_info(),
        "Threads": thread_info(),
        "Versions": versions(),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``0.912 ± 0.004``; just the mean for one run, ``—`` for none."""
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(path: Path, title: str, sections: Sequence[str], command: Sequence[str] | None = None) -> None:
    """Write a Markdown report: title, run information (``command``: see :func:`run_info`), then ``sections``."""
    info = "\n".join(f"- **{key}:** {value}" for key, value in run_info(command).items())
    path.write_text(f"# {title}\n\n{info}\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------- plots


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, summary: pd.DataFrame, columns: Sequence[str], title: str, by: str, colors: dict[str, Any]) -> None:
    """Grouped bars on ``ax``: one group per metric, one bar per row of ``summary``, error bars = its std."""
    width = 0.8 / max(1, len(summary))
    for index, (_, row) in enumerate(summary.iterrows()):
        positions = np.arange(len(columns)) + (index - (len(summary) - 1) / 2) * width
        means = [row[f"{c}_mean"] for c in columns]
        errors = [0 if math.isnan(row[f"{c}_std"]) else row[f"{c}_std"] for c in columns]
        ax.bar(positions, means, width, yerr=errors, capsize=3, label=row[by], color=colors[row[by]])
    ax.set_xticks(np.arange(len(columns)), columns)
    lowest = np.nanmin(summary[[f"{c}_mean" for c in columns]].to_numpy(dtype=float), initial=1.0)
    ax.set_ylim(max(0.0, lowest - 0.1), 1.0)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def bar_panels(panels: dict[str, pd.DataFrame], columns: Sequence[str], path: Path, by: str = "model") -> None:
    """One panel of grouped bars (:func:`bar_plot`) per entry of ``panels`` (title: summary), one shared legend."""
    plt = pyplot()
    per_row = min(3, len(panels))
    rows = math.ceil(len(panels) / per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=((1.6 + 2.2 * len(columns)) * per_row, 3.6 * rows), squeeze=False)
    labels = list(dict.fromkeys(label for summary in panels.values() for label in summary[by]))
    palette = plt.get_cmap("tab10")
    colors = {label: palette(index % 10) for index, label in enumerate(labels)}  # one colour per model everywhere
    for ax, (title, summary) in zip(axes.flat, panels.items(), strict=False):
        _bars(ax, summary, columns, title, by, colors)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[label]) for label in labels]
    fig.legend(handles, labels, fontsize="small", loc="lower center", ncol=min(5, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.12 / rows, 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def defect_examples(datamodule: Any, count: int, image_size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``count`` defective test images, one folder (defect type) after another: names, images, masks, resized
    to ``image_size`` (images bilinear, masks nearest)."""
    samples = datamodule.test_data.samples.reset_index(drop=True)
    defective = samples[samples.label_index == 1]
    folders = defective.image_path.map(defect_type)
    by_type = [list(group.index) for _, group in defective.groupby(folders, sort=True)]
    longest = max(map(len, by_type), default=0)
    picked = [group[i] for i in range(longest) for group in by_type if i < len(group)][:count]
    size = (image_size, image_size)
    names, images, masks = [], [], []
    for index in picked:
        item = datamodule.test_data[index]
        path = Path(samples.image_path[index])
        names.append(f"{path.parent.name}/{path.stem}")
        images.append(F.interpolate(item.image[None], size=size, mode="bilinear", align_corners=False)[0])
        masks.append(F.interpolate(item.gt_mask[None, None].float(), size=size, mode="nearest")[0, 0])
    if not picked:
        return [], torch.empty(0, 3, *size), torch.empty(0, *size)
    return names, torch.stack(images), torch.stack(masks)


@torch.no_grad()
def predict_maps(model: AnomalibModule, images: torch.Tensor) -> np.ndarray:
    """Post-processed anomaly maps of ``images`` (min-max scaled over the validation set), ``(N, H, W)`` at the
    images' size."""
    model.eval()
    device = next(model.parameters()).device
    maps = model(images.to(device)).anomaly_map.float()
    maps = maps.reshape(len(images), 1, *maps.shape[-2:])
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return maps[:, 0].cpu().numpy()


def heatmap_sheet(
    names: Sequence[str], images: torch.Tensor, masks: torch.Tensor, maps: dict[str, np.ndarray], path: Path
) -> None:
    """One row per image: image | ground truth | each model's map over the image."""
    plt = pyplot()
    columns = ["image", "ground truth", *maps]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.6 * len(columns), 2.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        image = images[row].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(name, fontsize=8)
        axes[row, 1].imshow(masks[row].numpy(), cmap="gray", vmin=0, vmax=1)
        for column, anomaly_map in enumerate(maps.values(), start=2):
            axes[row, column].imshow(image)
            axes[row, column].imshow(anomaly_map[row], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for column, title in enumerate(columns):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
