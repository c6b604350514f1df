"""The benchmark harness: an ``anomalib benchmark`` config in, one results table, report, plots and heatmaps out.

Comparison (``dev.yaml``), loss ablation (``ablation.yaml``) and MVTec AD (``mvtec_*.yaml``) all run from
configs in anomalib's benchmark format: a grid over seeds, models (``class_path`` + ``init_args``) and
datamodules (any anomalib datamodule, by class name)::

    accelerator: cpu                  # or cuda, or a list: the whole grid once per accelerator
    trainer:                          # optional, read by this harness only (anomalib benchmark ignores it):
      max_epochs: 40                  #   Engine arguments of every job
    baseline: GKD                     # optional: the report adds each model's change against this label
    benchmark:
      seed: {grid: [0, 1, 2]}
      model:
        grid:
          - class_path: Tdad          # bare names are looked up in anomalib.models (Tdad: the start-up hook)
            label: TDAD               # optional table label (default: from the class and its arguments)
            max_epochs: 40            # optional, this model only
            init_args: {lambda_dmd: 0.0}
      data:
        grid:
          - {class_path: MVTecAD, init_args: {root: ../shared/data, category: magnetic_tile}}
          - {class_path: Kolektor, init_args: {root: ../shared/data/kolektor}}

Usage (from the repository root)::

    python benchmarks/benchmark.py --config benchmarks/dev.yaml
    python benchmarks/benchmark.py --config benchmarks/dev.yaml --image-size 128 --seeds 0 \\
        --init-arg Patchcore.coreset_sampling_ratio=0.01         # the labelled 2-core-CPU shortcut
    python benchmarks/benchmark.py --config benchmarks/ablation.yaml --max-epochs 1 --limit-train 32 \\
        --limit-test 60 --image-size 128 --seeds 0               # a quick check (numbers mean nothing)
    python benchmarks/benchmark.py --config benchmarks/dev.yaml --models TDAD --track-every 5 \
        --rescore score_topk=[0.001,0.01] --rescore sigma=[2,8]   # a curve by epoch; inference settings
    python benchmarks/benchmark.py --merge results/benchmarks/run-a results/benchmarks/run-b  # e.g. per-seed runs

Every job trains with anomalib's ``Engine`` and tests with an anomalib ``Evaluator`` that holds image AUROC,
pixel AUROC, PRO (anomalib's ``AUPRO``, FPR limit 0.3) and, for MVTec-layout sets, the pixel AUROC and PRO of
each defect type (``common.DefectTypeAUROC``, ``common.DefectTypeAUPRO``: that folder's test images together with
the good ones). Scores and maps
are min-max scaled by a ``common.MinMaxPostProcessor``; both components are passed to each model as
``evaluator=`` and ``post_processor=``. Nothing of anomalib is patched or rebound. Writes to ``--output``
(default ``results/benchmarks/<timestamp>-<config name>/``): ``config.yaml`` (the grid as run), ``run.json``
(the command line's settings),
``results.csv`` (one row per job, rewritten after each), ``summary.csv`` and ``report.md`` (mean ± sample
std over seeds per model and dataset, and the mean over datasets), ``metrics.png`` and ``heatmaps.png``.
Exits 1 when any job failed (anomalib's own command exits 0 then), 2 when the config or its data is unusable.

What is anomalib's here, and why not all of its benchmark pipeline:

- **Reused:** the config format and its grid expansion (``get_iterator_from_grid_dict``, the function
  anomalib's ``BenchmarkJobGenerator`` expands configs with, so the jobs and their order are the same),
  ``flatten_dict`` for each job's flat config (the ``model.*``/``data.*`` columns of anomalib's own result
  rows), ``get_datamodule`` for the data, model classes by bare name from ``anomalib.models`` (as
  ``get_model`` resolves them), each model's ``configure_pre_processor``, ``Engine``, ``Evaluator``,
  ``AUROC``, ``AUPRO`` and ``PostProcessor`` (subclassed).
- **Not used:** ``BenchmarkJobGenerator`` builds each model with ``get_model`` while it expands the grid, before
  the job's seed is set (a model's initial weights would depend on the jobs before it) and without components:
  ``get_model``'s keyword arguments go through OmegaConf, which refuses an ``Evaluator`` or a
  ``PostProcessor`` object. ``BenchmarkJob.run`` makes its own ``Engine`` with no training length (Lightning
  would train 1000 epochs), validation after every epoch and no callbacks; its ``collect`` takes the columns of
  the first job only (other ``init_args`` crash it after all training) and ``save`` writes to ``./runs``.
  So :class:`Job` is this harness's own job, fed by anomalib's grid expansion, and :func:`run_jobs` runs them
  in order with one progress bar, the way anomalib's ``SerialRunner`` does, keeping a failed job's error
  as its row instead of only logging it.

Training length of a job, first match: the model's own (``trainer_arguments``: PatchCore and PaDiM fit in 1
epoch, as anomalib's ``Engine`` enforces); ``--max-epochs``; the model entry's ``max_epochs``; ``trainer:
max_epochs``; the model's ``default_epochs`` (TDAD: 40); otherwise the job fails and says so. Validation (which
fits the post-processor's threshold and scaling) runs once, after the last epoch (``--track-every N``: every N
epochs, written to ``curve.csv``). ``--rescore KEY=VALUES`` tests each trained model again with an init_arg that
only changes inference (TDAD's ``score_topk``, ``sigma``, ``level_weights``): the job's model is built with the
value, takes the trained network's weights and fitted state (``model.load_state_dict``), validates (fitting its
post-processor) and tests, as a row ``<model> · KEY=VALUE``. ``--save-models`` keeps each trained model's
state dict in ``models/`` of the output; ``--from-models FOLDER`` then tests those models instead of training
them (the same config: the jobs find their files by model, dataset and seed), e.g. to rescore them later.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import inspect
import json
import math
import re
import sys
import tempfile
import time
import traceback
import types
import typing
from collections import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from anomalib.callbacks import ModelCheckpoint
from anomalib.data import AnomalibDataModule, get_datamodule
from anomalib.engine import Engine
from anomalib.models import AnomalibModule
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict
from anomalib.utils.config import flatten_dict
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.utilities.seed import isolate_rng
from tqdm.auto import tqdm

from anomalib_tdad.export import check_nncf, predict_batch

METRICS = common.METRICS  # anomalib's metric name -> report name
TYPE_PREFIXES = common.TYPE_PREFIXES  # metric -> prefix of the results.csv columns of one defect type's metric
TYPE_COLUMNS = tuple(TYPE_PREFIXES.values())
MODEL_KEYS = {"class_path", "init_args", "label", "max_epochs"}
DATA_KEYS = {"class_path", "init_args", "label"}
RESERVED_TRAINER_KEYS = {"accelerator", "devices", "default_root_dir", "callbacks", "check_val_every_n_epoch"}
DISPLAY_SIZE = 256  # heatmap sheet size without --image-size (anomalib's default input size)
MEAN_LABEL = "mean over datasets"
EXPORTS = {"f32": "OpenVINO f32", "int8_ptq": "OpenVINO INT8 (int8_ptq)", "int8_acq": "OpenVINO INT8 (int8_acq)"}


def export_column(mode: str, metric: str) -> str:
    """results.csv column of a metric of the model exported with ``mode`` (a key of :data:`EXPORTS`)."""
    return f"{EXPORTS[mode]} · {metric}"


def change_column(mode: str, metric: str) -> str:
    """Column of the change of a metric from the f32 IR (without one: the torch model) to ``mode``'s."""
    return f"{EXPORTS[mode]} change · {metric}"


class ConfigError(ValueError):
    """The config (or an override of it) cannot be run."""


# ---------------------------------------------------------------------------------------------- config


def grid_entries(node: Any, expand: bool = True) -> list[dict[str, Any]]:
    """The entries of a ``model``/``data`` node (``{grid: [...]}`` or one entry), grids inside them expanded."""
    entries = node["grid"] if isinstance(node, dict) and "grid" in node else [node]
    if not entries or not all(isinstance(entry, dict) and "class_path" in entry for entry in entries):
        msg = f"Expected entries with a class_path, got {node!r}."
        raise ConfigError(msg)
    if not expand:
        return copy.deepcopy(entries)
    return [expanded for entry in entries for expanded in get_iterator_from_grid_dict(entry)]


def as_node(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of :func:`grid_entries`: one entry, or a grid of them."""
    return entries[0] if len(entries) == 1 else {"grid": entries}


def check_keys(entry: dict[str, Any], allowed: set[str], kind: str) -> None:
    """Refuse keys of a config entry that neither anomalib nor this harness reads (typos)."""
    unknown = set(entry) - allowed
    if unknown:
        msg = f"{kind} entry {entry.get('class_path')}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})."
        raise ConfigError(msg)


def matching(entries: list[dict[str, Any]], name: str, label: Any = None) -> list[dict[str, Any]]:
    """The entries a command-line ``name`` selects: those labelled exactly ``name`` if any (``TDAD``: TDAD
    only), else those whose class or label is ``name`` ignoring case (``tdad``: TDAD and RD)."""
    label = label or model_label
    exact = [entry for entry in entries if label(entry) == name]
    return exact or [entry for entry in entries if name.lower() in {model_name(entry).lower(), label(entry).lower()}]


def split_override(override: str, labels: Sequence[str]) -> tuple[str, str, str, str]:
    """``(name, key, "=", value)`` of an ``--init-arg NAME.KEY=VALUE``; ``sep`` is empty when there is no ``=``.

    ``NAME`` may be an entry's label that holds ``=`` or ``.`` itself (``RD (TDAD λs=λd=0, same teacher)``): the
    longest label followed by a dot is taken first, else ``NAME`` ends at the last dot before the first ``=``.
    """
    for label in sorted(labels, key=len, reverse=True):
        if override.startswith(f"{label}."):
            key, sep, value = override[len(label) + 1 :].partition("=")
            return label, key, sep, value
    target, sep, value = override.partition("=")
    name, _, key = target.rpartition(".")
    return name, key, sep, value


def parse_value(text: str) -> Any:
    """A command-line value read as YAML (``0.01`` -> float, ``[a, b]`` -> list, ``none`` -> None)."""
    return yaml.safe_load(text)


def load_config(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The config at ``path`` with the command-line overrides applied, data roots made absolute.

    The result is again an anomalib benchmark config (saved as ``config.yaml``): grids inside model and data
    entries are expanded into grid entries, which anomalib's own expansion does not look into.
    """
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(str(error)) from error
    if not isinstance(config, dict) or not isinstance(config.get("benchmark"), dict):
        msg = f"{path}: no 'benchmark' section (anomalib benchmark format)."
        raise ConfigError(msg)
    bench = config["benchmark"]
    for key in ("model", "data"):
        if key not in bench:
            msg = f"{path}: benchmark.{key} is missing."
            raise ConfigError(msg)
    if args.seeds:
        bench["seed"] = {"grid": list(args.seeds)} if len(args.seeds) > 1 else args.seeds[0]
    bench.setdefault("seed", 0)
    if args.accelerator:
        config["accelerator"] = list(args.accelerator)
    config.setdefault("accelerator", "auto")
    trainer = config.setdefault("trainer", {}) or {}
    if not isinstance(trainer, dict) or set(trainer) & RESERVED_TRAINER_KEYS:
        msg = f"trainer: a mapping of Engine arguments other than {sorted(RESERVED_TRAINER_KEYS)}, got {trainer!r}."
        raise ConfigError(msg)
    config["trainer"] = trainer

    models = grid_entries(bench["model"])
    for entry in models:
        check_keys(entry, MODEL_KEYS, "Model")
    if args.models:
        models = [entry for entry in models if any(entry in matching(models, name) for name in args.models)]
        if not models:
            msg = f"--models {args.models}: no model entry of these classes or labels."
            raise ConfigError(msg)
    for override in args.init_arg:
        name, key, sep, value = split_override(override, [model_label(entry) for entry in models])
        if not (sep and name and key):
            msg = f"--init-arg expects CLASS_OR_LABEL.KEY=VALUE, got {override!r}."
            raise ConfigError(msg)
        chosen = matching(models, name)
        if not chosen:
            msg = f"--init-arg {override!r}: no model entry of class or label {name!r}."
            raise ConfigError(msg)
        for entry in chosen:
            entry["init_args"] = {**(entry.get("init_args") or {}), key: parse_value(value)}
    labels = [model_label(entry) for entry in models]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        msg = f"Several model entries are labelled {duplicates}: give each a distinct 'label:'."
        raise ConfigError(msg)
    bench["model"] = as_node(models)

    datasets = grid_entries(bench["data"], expand=False)
    for entry in datasets:
        check_keys(entry, DATA_KEYS, "Data")
        init = entry["init_args"] = dict(entry.get("init_args") or {})
        if args.categories and "category" in init:
            init["category"] = {"grid": list(args.categories)}
        if args.root is not None:
            init["root"] = str(args.root)
        if init.get("root") is not None:
            init["root"] = str(Path(init["root"]).expanduser().resolve())
        if args.num_workers is not None:
            init["num_workers"] = args.num_workers
    datasets = [expanded for entry in datasets for expanded in get_iterator_from_grid_dict(entry)]
    if args.datasets:
        chosen = [matching(datasets, name, data_label) for name in args.datasets]
        datasets = [entry for entry in datasets if any(entry in entries for entries in chosen)]
        if not datasets:
            msg = f"--datasets {args.datasets}: no data entry of these labels or classes."
            raise ConfigError(msg)
    bench["data"] = as_node(datasets)
    return config


def model_name(entry: dict[str, Any]) -> str:
    """The class name of a model entry (the last part of its ``class_path``)."""
    return str(entry["class_path"]).rsplit(".", 1)[-1]


def model_label(entry: dict[str, Any]) -> str:
    """Table label of a model entry: its ``label``, else one derived from the class and its arguments."""
    return str(entry.get("label") or common.model_label(str(entry["class_path"]), entry.get("init_args") or {}))


def data_label(entry: dict[str, Any]) -> str:
    """Table label of a data entry: its ``label``, else ``Class/category`` (``Class`` without a category)."""
    if entry.get("label"):
        return str(entry["label"])
    category = (entry.get("init_args") or {}).get("category")
    name = str(entry["class_path"]).rsplit(".", 1)[-1]
    return f"{name}/{category}" if category else name


def missing_data(config: dict[str, Any]) -> list[str]:
    """The data folders a config names that do not exist (``root``, and ``root/category`` where set).

    Checked before anything runs: anomalib's datamodules would otherwise try to download what is missing.
    """
    missing = []
    for entry in grid_entries(config["benchmark"]["data"]):
        init = entry.get("init_args") or {}
        if init.get("root") is None:
            continue
        folder = Path(init["root"]) / str(init.get("category") or "")
        if not folder.is_dir():
            missing.append(f"{data_label(entry)}: {folder}")
    return missing


def model_class(class_path: str) -> type[AnomalibModule]:
    """The model class of ``class_path``: a bare name in ``anomalib.models`` (as ``get_model`` resolves it, e.g.
    ``Padim``; ``Tdad`` once the plugin's start-up hook has registered it), or a dotted ``module.Class``."""
    module_name, _, name = class_path.rpartition(".")
    found = getattr(importlib.import_module(module_name or "anomalib.models"), name, None)
    if not (isinstance(found, type) and issubclass(found, AnomalibModule)):
        where = module_name or "anomalib.models"
        msg = f"{class_path!r} is no anomalib model (no AnomalibModule {name!r} in {where})."
        raise ValueError(msg)
    return found


# ------------------------------------------------------------------------------------------------ jobs


@dataclass
class Options:
    """What the command line sets for every job."""

    image_size: int | None = None
    max_epochs: int | None = None
    limit_train: int = 0
    limit_test: int = 0
    heatmaps: int = 4
    trainer: dict[str, Any] = field(default_factory=dict)
    openvino: tuple[str, ...] = ()
    track_every: int = 0
    rescore: tuple[tuple[str, Any], ...] = ()  # (init_arg, values) tested on each trained model
    save_models: Path | None = None  # folder for each trained model's state dict
    from_models: Path | None = None  # folder of saved state dicts: load and test them instead of training


@dataclass
class Job:
    """Train and test one model on one datamodule with one seed (one point of the config's grid)."""

    accelerator: str
    container: dict[str, Any]  # {"seed": ..., "model": {...}, "data": {...}}, as anomalib's expansion yields it
    options: Options

    @property
    def seed(self) -> int:
        """The job's seed (Lightning's ``seed_everything`` before the data and the model are made)."""
        return int(self.container["seed"])

    @property
    def label(self) -> str:
        """The model's table label."""
        return model_label(self.container["model"])

    @property
    def dataset(self) -> str:
        """The dataset's table label."""
        return data_label(self.container["data"])

    def describe(self) -> dict[str, Any]:
        """The identifying columns of the job's results row."""
        return {"model": self.label, "dataset": self.dataset, "seed": self.seed, "accelerator": self.accelerator}

    def model_file(self, folder: Path) -> Path:
        """Where ``--save-models`` keeps this job's trained model and ``--from-models`` looks for it."""
        return folder / (re.sub(r"[^\w.-]+", "_", f"{self.label}-{self.dataset}-seed{self.seed}").strip("_") + ".pt")

    def datamodule(self) -> AnomalibDataModule:
        """anomalib's datamodule of the job, set up and cut to ``--limit-train``/``--limit-test``."""
        entry = {key: value for key, value in self.container["data"].items() if key != "label"}
        datamodule = get_datamodule(copy.deepcopy(entry))
        return common.limit_datamodule(datamodule, self.options.limit_train, self.options.limit_test)

    def model(self, defect_types: Sequence[str], **overrides: Any) -> AnomalibModule:
        """The model of the job, with the benchmark's evaluator and post-processor (and pre-processor when
        ``--image-size`` is set); ``overrides`` replace init_args."""
        entry = self.container["model"]
        cls = model_class(str(entry["class_path"]))
        kwargs = copy.deepcopy(entry.get("init_args") or {}) | overrides
        if self.options.image_size:
            size = (self.options.image_size, self.options.image_size)
            kwargs["pre_processor"] = cls.configure_pre_processor(image_size=size)
        return cls(
            **kwargs,
            post_processor=common.MinMaxPostProcessor(),
            evaluator=common.make_evaluator(defect_types, validation=bool(self.options.track_every)),
            visualizer=False,
        )

    def epochs(self, model: AnomalibModule) -> int:
        """Training epochs (first match): the model's own, ``--max-epochs``, the entry's ``max_epochs``,
        ``trainer: max_epochs``, the model's ``default_epochs``."""
        fixed = model.trainer_arguments.get("max_epochs")
        if fixed is not None:
            return int(fixed)
        candidates = [
            self.options.max_epochs,
            self.container["model"].get("max_epochs"),
            self.options.trainer.get("max_epochs"),
            getattr(model, "default_epochs", None),
        ]
        for value in candidates:
            if value is not None:
                return int(value)
        msg = (
            f"{self.label}: no training length. Set max_epochs in its model entry or the trainer section, or "
            "pass --max-epochs (anomalib's benchmark sets none: Lightning would train 1000 epochs)."
        )
        raise ValueError(msg)

    def cadence(self, epochs: int) -> int:
        """Epochs between validations: all of them (validate once, after the last), or ``--track-every`` for a
        model that trains more than one epoch (it must divide the epochs: the last one fits the post-processor)."""
        every = self.options.track_every
        if not every or epochs == 1:
            return epochs
        if epochs % every:
            msg = f"{self.label}: --track-every {every} does not divide its {epochs} epochs."
            raise ValueError(msg)
        return every

    def run(
        self, callbacks: Sequence[Callback] = (), heatmaps: bool = False
    ) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
        """Fit and test; returns the results row, with ``heatmaps`` ``(names, images, masks, maps)`` of a few
        defective test images (else None), and the rows of ``--rescore``. Exceptions propagate (:func:`run_jobs`
        records them)."""
        row = self.describe()
        seed_everything(self.seed, workers=True)
        datamodule = self.datamodule()
        types = common.defect_types(datamodule.test_data)
        with isolate_rng():  # a probe: the job's model is built from the same random state either way
            probe = self.model(types)
            epochs = self.epochs(probe)
            cadence = self.cadence(epochs)
            # A model that sets its own cadence (TDAD's check_val_every_n_epoch) wins over the Engine's setting.
            own = probe.trainer_arguments.get("check_val_every_n_epoch", cadence) != cadence
            del probe
        model = self.model(types, **({"check_val_every_n_epoch": cadence} if own else {}))
        row |= {
            "epochs": epochs,
            "image_size": self.options.image_size or "default",
            "train_images": len(datamodule.train_data),
            "test_images": len(datamodule.test_data),
        }
        quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
        trainer = {key: value for key, value in self.options.trainer.items() if key != "max_epochs"}
        with tempfile.TemporaryDirectory() as workdir:
            engine = Engine(
                **{"num_sanity_val_steps": 0, **quiet, **trainer},
                max_epochs=epochs,
                check_val_every_n_epoch=cadence,  # once, after the last epoch, unless tracked
                accelerator=self.accelerator,
                devices=1,
                default_root_dir=workdir,
                callbacks=[ModelCheckpoint(save_top_k=0, save_last=False), *callbacks],
            )
            start = time.perf_counter()
            if self.options.from_models:
                row["loaded_from"] = str(self.load(model, self.options.from_models))
                engine.validate(model=model, datamodule=datamodule, verbose=False)  # fits the post-processor
            else:
                engine.fit(model=model, datamodule=datamodule)
                row["fit_s"] = round(time.perf_counter() - start, 1)
            fitted = time.perf_counter()
            metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
            row["test_s"] = round(time.perf_counter() - fitted, 1)
            if self.options.save_models:
                self.options.save_models.mkdir(parents=True, exist_ok=True)
                torch.save(trained_state(model), self.model_file(self.options.save_models))
            rescored = self.rescored_rows(model, types, datamodule, base=dict(row))
            row |= metric_columns(metrics, types)
        if self.options.openvino:
            start = time.perf_counter()
            for mode in self.options.openvino:
                try:
                    exported = openvino_metrics(model, datamodule, mode)
                except Exception as error:  # noqa: BLE001 - keep the torch results of hours of training
                    traceback.print_exc()
                    row["openvino_error"] = f"{mode}: {type(error).__name__}: {error}"[:300]
                    continue
                row |= {export_column(mode, label): value for label, value in exported.items()}
            row["openvino_s"] = round(time.perf_counter() - start, 1)
        sheet = None
        if heatmaps and self.options.heatmaps:
            size = self.options.image_size or DISPLAY_SIZE
            names, images, masks = common.defect_examples(datamodule, self.options.heatmaps, size)
            if names:
                sheet = (names, images, masks, common.predict_maps(model, images))
        del engine, model
        return row, sheet, rescored

    def load(self, model: AnomalibModule, folder: Path) -> Path:
        """Load this job's saved state dict from ``folder`` into ``model``; returns its path."""
        path = self.model_file(folder)
        if not path.is_file():
            msg = f"{self.label} · {self.dataset} · seed {self.seed}: no saved model {path} (run with --save-models)."
            raise FileNotFoundError(msg)
        load_trained_state(model, torch.load(path, map_location="cpu", weights_only=True))
        return path

    def rescored_rows(
        self, trained: AnomalibModule, types: Sequence[str], datamodule: AnomalibDataModule, base: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """A results row per ``--rescore`` value that ``trained``'s class takes: ``base`` (the job's columns
        without its metrics) with the rescored test's. A rescore that fails is a failed row, not a failed job."""
        rows = []
        pairs = [(key, value) for key, values in self.options.rescore for value in rescore_values(trained, key, values)]
        for key, value in pairs:
            row = {**base, "model": f"{self.label} · {key}={value}"}
            try:
                row |= {"status": "ok", **self.rescore(trained, types, datamodule, key, value)}
            except Exception as error:  # noqa: BLE001 - keep the trained model's own results
                traceback.print_exc()
                row |= {"status": "failed", "error": f"{type(error).__name__}: {error}"[:500]}
            rows.append(row)
        return rows

    def rescore(
        self, trained: AnomalibModule, types: Sequence[str], datamodule: AnomalibDataModule, key: str, value: Any
    ) -> dict[str, Any]:
        """The test scores of ``trained``'s network (its weights and fitted state: TDAD's map statistics, a memory
        bank and whether it is fitted) in the job's model built with ``key=value``: an inference setting (e.g. TDAD's
        ``score_topk``, PatchCore's ``num_neighbors``) screened without training again. A validation fits the new
        model's post-processor first, as after training."""
        model = self.model(types, **{key: value})
        load_trained_state(model, trained_state(trained))
        quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
        with tempfile.TemporaryDirectory() as workdir:
            engine = Engine(**quiet, accelerator=self.accelerator, devices=1, default_root_dir=workdir)
            start = time.perf_counter()
            engine.validate(model=model, datamodule=datamodule, verbose=False)
            metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        return {"test_s": round(time.perf_counter() - start, 1), **metric_columns(metrics, types)}


def _trained(key: str) -> bool:
    """Whether a state-dict key is the model's own, not its evaluator's (metric buffers: settings of the harness)."""
    return not key.startswith("evaluator.")


def trained_state(model: AnomalibModule) -> dict[str, torch.Tensor]:
    """``model``'s state dict without its evaluator's, whose metric buffers are settings of the harness, not trained."""
    return {key: value for key, value in model.state_dict().items() if _trained(key)}


def load_trained_state(model: AnomalibModule, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`trained_state` (or a whole state dict, its evaluator's keys ignored) into ``model``: a model
    saved before the harness's metrics changed still loads."""
    own = {key: value for key, value in state.items() if _trained(key)}
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [key for key in missing if _trained(key)]
    if missing or unexpected:
        msg = f"The saved model does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}."
        raise RuntimeError(msg)


def metric_columns(metrics: dict[str, Any], types: Sequence[str]) -> dict[str, float]:
    """The results columns of a test's ``metrics``: the main ones and the pixel AUROC and PRO of each defect type."""
    row = {label: float(metrics[key]) for key, label in METRICS.items() if key in metrics}
    return row | {
        f"{prefix}{kind}": float(metrics[f"pixel_{metric}[{kind}]"])
        for metric, prefix in TYPE_PREFIXES.items()
        for kind in types
    }


def openvino_metrics(model: AnomalibModule, datamodule: AnomalibDataModule, mode: str) -> dict[str, float]:
    """Image AUROC, pixel AUROC and PRO of ``model`` exported by anomalib (``model.to_openvino``, ``mode``: ``f32``
    or an INT8 compression type, calibrated on the datamodule) on the job's test set, as the torch test scores it.

    The test images go to the IR as the datamodule gives them (the exported graph holds the pre-processing), compiled
    for the CPU in f32 (OpenVINO's default on CPUs with bf16 would be bf16); their masks go through the model's
    pre-processing transform, as ``engine.test`` transforms them.
    """
    import openvino as ov
    from anomalib.deploy import CompressionType

    compression = None if mode == "f32" else CompressionType(mode)
    metrics = common.main_metrics()
    model = model.cpu().eval()
    with tempfile.TemporaryDirectory() as folder:
        path = model.to_openvino(folder, compression_type=compression, datamodule=datamodule)
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for batch in datamodule.test_dataloader():
            predicted = predict_batch(compiled, batch)  # the IR resizes and normalizes the images itself
            if model.pre_processor and model.pre_processor.transform:  # the masks as engine.test transforms them
                _, predicted.gt_mask = model.pre_processor.transform(batch.image, batch.gt_mask)
            for metric in metrics:
                metric.update(predicted)
    return {METRICS[metric.name]: float(metric.compute()) for metric in metrics}


class _EpochProgress(Callback):
    """Shows the running job and its epoch in the progress bar's postfix."""

    def __init__(self, bar: Any, job: Job) -> None:
        self.bar, self.job = bar, job

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        del pl_module
        job = self.job
        self.bar.set_postfix_str(
            f"{job.label} · {job.dataset} · seed {job.seed} · epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        )


class Curve(Callback):
    """The main validation metrics after each validation of a job (``--track-every``): rows of ``curve.csv``."""

    def __init__(self, job: Job, rows: list[dict[str, Any]]) -> None:
        self.job, self.rows = job, rows

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        del pl_module
        logged = trainer.callback_metrics
        scores = {label: float(logged[key]) for key, label in METRICS.items() if key in logged}
        self.rows.append({**self.job.describe(), "epoch": trainer.current_epoch + 1, **scores})


def expand_jobs(config: dict[str, Any], options: Options) -> list[Job]:
    """The config's jobs, in anomalib's order: per accelerator, its grid expansion of ``benchmark``."""
    accelerators = config["accelerator"] if isinstance(config["accelerator"], list) else [config["accelerator"]]
    return [
        Job(str(accelerator), copy.deepcopy(container), options)
        for accelerator in accelerators
        for container in get_iterator_from_grid_dict(config["benchmark"])
    ]


RESULT_COLUMNS = [
    "model", "dataset", "seed", "accelerator", "status", *METRICS.values(), "fit_s", "test_s", "epochs",
    "image_size", "train_images", "test_images", "error",
]  # fmt: skip


def results_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The rows with the union of their columns: fixed ones first, then per-type AUROC and PRO, then the flat
    config."""
    frame = pd.DataFrame(list(rows))
    types = [c for prefix in TYPE_PREFIXES.values() for c in sorted(frame.columns) if c.startswith(prefix)]
    exports = [column for column in frame.columns if column.startswith(tuple(EXPORTS.values()))]
    config = [column for column in frame.columns if column.startswith(("model.", "data."))]
    head = [*RESULT_COLUMNS[:5], *METRICS.values()]
    tail = [c for c in RESULT_COLUMNS if c not in head]
    optional = [column for column in ("openvino_s", "openvino_error", "loaded_from") if column in frame.columns]
    frame = frame.reindex(columns=[*head, *types, *exports, *tail, *optional, *config])
    for column in ("seed", "epochs", "train_images", "test_images"):  # integers, blank for a failed job
        frame[column] = frame[column].astype("Int64")
    return frame


@dataclass
class Heatmaps:
    """The heatmap sheet's content: per dataset the example images, per (dataset, model) the maps."""

    examples: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    maps: dict[tuple[str, str], Any] = field(default_factory=dict)

    def wants(self, job: Job) -> bool:
        """Whether ``job`` is the first of its model on its dataset (its maps go on the sheet)."""
        return (job.dataset, job.label) not in self.maps

    def add(self, job: Job, sheet: Any) -> None:
        """Keep a job's examples (the first for its dataset) and maps."""
        names, images, masks, maps = sheet
        self.examples.setdefault(job.dataset, (names, images, masks))
        self.maps[(job.dataset, job.label)] = maps

    def write(self, path: Path, labels: Sequence[str]) -> bool:
        """Draw the sheet (rows: examples of every dataset; columns: image, ground truth, each model)."""
        if not self.examples:
            return False
        names, images, masks, maps = [], [], [], {label: [] for label in labels}
        for dataset, (example_names, example_images, example_masks) in self.examples.items():
            names += [f"{dataset}\n{name}" for name in example_names]
            images.append(example_images)
            masks.append(example_masks)
            blank = torch.full(example_masks.shape, math.nan).numpy()
            for label in labels:
                maps[label].append(self.maps.get((dataset, label), blank))
        stacked = {label: np.concatenate(values) for label, values in maps.items()}
        common.heatmap_sheet(names, torch.cat(images), torch.cat(masks), stacked, path)
        return True


def run_jobs(jobs: Sequence[Job], output: Path) -> tuple[pd.DataFrame, Heatmaps, pd.DataFrame]:
    """Run ``jobs`` in order under one progress bar; ``output/results.csv`` (and with ``--track-every``
    ``curve.csv``, the validation metrics by epoch) is rewritten after each job.

    A job that raises becomes a row with status ``failed`` and its error; the others still run.
    """
    rows: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    heatmaps = Heatmaps()
    with tqdm(total=len(jobs), desc="benchmark", unit="job", dynamic_ncols=True) as bar:
        for job in jobs:
            bar.set_postfix_str(f"{job.label} · {job.dataset} · seed {job.seed}")
            flat = {
                k: v if isinstance(v, str | int | float | bool) or v is None else str(v)
                for k, v in flatten_dict(job.container).items()
                if k != "seed"
            }  # the job's config columns, as anomalib's result rows have them
            try:
                wanted = heatmaps.wants(job)
                tracking = [Curve(job, curve)] if job.options.track_every else []
                row, sheet, rescored = job.run(callbacks=[_EpochProgress(bar, job), *tracking], heatmaps=wanted)
                row["status"] = "ok"
                if sheet is not None:
                    heatmaps.add(job, sheet)
            except Exception as error:  # noqa: BLE001 - one failed job must not lose hours of others
                traceback.print_exc()
                row = {**job.describe(), "status": "failed", "error": f"{type(error).__name__}: {error}"[:500]}
                rescored = []
            rows += [{**row, **flat}, *({**extra, **flat} for extra in rescored)]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            results_table(rows).to_csv(output / "results.csv", index=False)
            if curve:
                pd.DataFrame(curve).to_csv(output / "curve.csv", index=False)
            bar.update()
    return results_table(rows), heatmaps, pd.DataFrame(curve)


# --------------------------------------------------------------------------------------------- reports


def summarize(results: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Mean and sample std over seeds of ``columns`` per dataset and model (successful jobs), in order of first
    appearance; with more than one dataset, also the mean over datasets of each model's means (models with
    results on every dataset only; no std)."""
    done = results[results.status == "ok"]
    columns = [column for column in columns if column in done and done[column].notna().any()]
    if done.empty:
        return pd.DataFrame(columns=["dataset", "model", "runs"])
    grouped = done.groupby(["dataset", "model"], sort=False)[columns]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_std"))
    summary.insert(0, "runs", done.groupby(["dataset", "model"], sort=False).size())
    summary = summary.reset_index()
    datasets = list(dict.fromkeys(results.dataset))
    if len(datasets) > 1:
        rows = []
        for model, group in summary.groupby("model", sort=False):
            if set(group.dataset) != set(datasets):
                continue
            kept = [c for c in columns if not c.startswith(TYPE_COLUMNS)]
            means = {f"{c}_mean": group[f"{c}_mean"].mean() for c in kept}
            stds = {f"{c}_std": math.nan for c in columns}
            rows.append({"dataset": MEAN_LABEL, "model": model, "runs": int(group.runs.min()), **means, **stds})
        summary = pd.concat([summary, pd.DataFrame(rows)], ignore_index=True)
    return summary


def _cell(row: pd.Series | None, column: str, digits: int = 3) -> str:
    """``mean ± std`` of ``column`` in a summary row, ``—`` when absent."""
    if row is None or f"{column}_mean" not in row:
        return "—"
    return common.mean_std(float(row[f"{column}_mean"]), float(row[f"{column}_std"]), digits)


def metric_table(summary: pd.DataFrame, column: str, models: Sequence[str], digits: int = 3) -> str:
    """Markdown: a row per dataset (and the mean over datasets), a column per model."""
    rows = []
    for dataset in dict.fromkeys(summary.dataset):
        part = summary[summary.dataset == dataset].set_index("model")
        rows.append([dataset, *(_cell(part.loc[m] if m in part.index else None, column, digits) for m in models)])
    return common.markdown_table(["dataset", *models], rows)


def type_tables(summary: pd.DataFrame, prefix: str) -> list[str]:
    """Markdown: per dataset with defect types, a row per model and a column per type, of the metric whose
    results columns start with ``prefix``."""
    sections = []
    for dataset in dict.fromkeys(summary.dataset):
        part = summary[summary.dataset == dataset]
        kinds = [
            c.removeprefix(prefix).removesuffix("_mean")
            for c in part.columns
            if c.startswith(prefix) and c.endswith("_mean") and part[c].notna().any()
        ]
        if kinds:
            rows = [[row.model, *(_cell(row, prefix + kind) for kind in kinds)] for _, row in part.iterrows()]
            sections.append(f"**{dataset}**\n\n" + common.markdown_table(["model", *kinds], rows))
    return sections


def baseline_table(summary: pd.DataFrame, baseline: str, metrics: Sequence[str]) -> str:
    """Markdown: each model's change of the mean against ``baseline``, per dataset (and the mean)."""
    rows = []
    for dataset in dict.fromkeys(summary.dataset):
        part = summary[summary.dataset == dataset].set_index("model")
        if baseline not in part.index:
            continue
        base = part.loc[baseline]
        for model, row in part.drop(index=baseline).iterrows():
            cells = [f"{row[f'{m}_mean'] - base[f'{m}_mean']:+.3f}" if f"{m}_mean" in row else "—" for m in metrics]
            rows.append([dataset, model, *cells])
    if not rows:
        return ""
    table = common.markdown_table(["dataset", "model", *metrics], rows)
    return f"## Change against {baseline}\n\nChange of each model's mean against **{baseline}**:\n\n{table}"


def add_export_changes(results: pd.DataFrame, modes: Sequence[str]) -> list[str]:
    """Add each INT8 export's change of every metric against the f32 IR of the same job (or, without an f32
    export, against the torch model) to ``results``; returns the new columns."""
    added = []
    for mode in modes:
        if mode == "f32":
            continue
        for metric in METRICS.values():
            reference = export_column("f32", metric) if "f32" in modes else metric
            if export_column(mode, metric) in results and reference in results:
                results[change_column(mode, metric)] = results[export_column(mode, metric)] - results[reference]
                added.append(change_column(mode, metric))
    return added


def export_section(results: pd.DataFrame, modes: Sequence[str], metrics: Sequence[str]) -> str:
    """Markdown: per dataset and model, the torch model's metrics and each OpenVINO export's, with the change of
    each INT8 export against the f32 IR (mean over seeds of the per-job change); over the jobs that were exported."""
    columns = [column for column in results.columns if column.startswith(tuple(EXPORTS[mode] for mode in modes))]
    exported = results[(results.status == "ok") & results[columns].notna().any(axis=1)]
    summary = summarize(exported, [*metrics, *columns])
    rows = []
    for _, row in summary[summary.dataset != MEAN_LABEL].iterrows():
        rows.append([row.dataset, row.model, "torch", *(_cell(row, metric) for metric in metrics)])
        for mode in modes:
            cells = []
            for metric in metrics:
                cell = _cell(row, export_column(mode, metric))
                change = f"{change_column(mode, metric)}_mean"
                if change in row and pd.notna(row[change]):
                    cell += f" ({row[change]:+.4f})"
                cells.append(cell)
            rows.append([row.dataset, row.model, EXPORTS[mode], *cells])
    reference = "the f32 IR" if "f32" in modes else "the torch model"
    return (
        "## Exported to OpenVINO\n\nEach model exported by anomalib after its test (`to_openvino`; INT8: calibrated "
        "on the datamodule's validation set, which anomalib's MVTecAD and Kolektor take from the test set), compiled "
        "for the CPU in f32 and scored on the same test set with the same metrics (`int8_acq` also tunes on it, so "
        "its change is optimistic). In brackets: the change of an INT8 model against "
        f"{reference} of the same job, mean over seeds. Only the jobs that were exported.\n\n"
        + common.markdown_table(["dataset", "model", "format", *metrics], rows)
    )


def curve_section(curve: pd.DataFrame, path: Path) -> str:
    """Markdown and ``path`` (a plot): the validation metrics by epoch, mean over seeds, per dataset and model."""
    metrics = [metric for metric in METRICS.values() if metric in curve]
    mean = curve.groupby(["dataset", "model", "epoch"], sort=False)[metrics].mean().reset_index()
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for (dataset, model), group in mean.groupby(["dataset", "model"], sort=False):
            ax.plot(group.epoch, group[metric], marker="o", label=f"{model} · {dataset}")
        ax.set(title=metric, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    rows = [
        [row.dataset, row.model, int(row.epoch), *(f"{row[metric]:.3f}" for metric in metrics)]
        for _, row in mean.iterrows()
    ]
    return (
        "## Validation metrics by epoch\n\n`--track-every`: the validation set's metrics after every validation, "
        "mean over seeds (anomalib's Kolektor and MVTecAD validate on their test set by default). The extra "
        "validations are in `fit seconds`; they do not change training (a job's epochs are seeded).\n\n"
        + common.markdown_table(["dataset", "model", "epoch", *metrics], rows)
        + f"\n\n![curve]({path.name})"
    )


def setup_note(config_path: Path, results: pd.DataFrame, options: Options) -> str:
    """The paragraph on what ran: config, jobs, data, input size, epochs, limits."""
    done = results[results.status == "ok"]
    failed = int((results.status != "ok").sum())
    lines = [
        f"Config `{config_path}` (as run: `config.yaml`): {len(results)} jobs, {len(results) - failed} finished, "
        f"{failed} failed; seeds {sorted(set(results.seed.astype(int)))}."
    ]
    for dataset, group in done.groupby("dataset", sort=False):
        lines.append(
            f"- `{dataset}`: {int(group.train_images.max())} training and {int(group.test_images.max())} test images."
        )
    if options.image_size:
        lines.append(
            f"- Input {options.image_size} × {options.image_size} px (`--image-size`): a CPU shortcut, not the "
            "256-px standard of anomalib's default pre-processors."
        )
    else:
        lines.append("- Input: each model's default pre-processor (anomalib's standard, 256 × 256 px).")
    epochs = done.groupby("model", sort=False).epochs.agg(lambda values: "/".join(map(str, sorted(set(values)))))
    lines.append("- Epochs: " + ", ".join(f"{model} {value}" for model, value in epochs.items()) + ".")
    if options.limit_train or options.limit_test:
        lines.append(
            f"- **Quick check**: at most {options.limit_train or 'all'} training and about "
            f"{options.limit_test or 'all'} test images per dataset; the numbers are not comparable to full runs."
        )
    return "\n".join(lines)


def write_outputs(
    output: Path,
    config: dict[str, Any],
    config_path: Path,
    results: pd.DataFrame,
    heatmaps: Heatmaps,
    options: Options,
    command: Sequence[str],
    curve: pd.DataFrame | None = None,
    merged: dict[Path, str | None] | None = None,
) -> None:
    """``summary.csv``, ``metrics.png``, ``heatmaps.png`` and ``report.md`` from the results (and ``curve.png``
    from the validation metrics by epoch, with ``--track-every``)."""
    metrics = [m for m in METRICS.values() if m in results and results[m].notna().any()]
    types = [column for column in results.columns if column.startswith(TYPE_COLUMNS)]
    exports = [column for column in results.columns if column.startswith(tuple(EXPORTS.values()))]
    changes = add_export_changes(results, options.openvino)
    summary = summarize(results, [*metrics, "fit_s", *types, *exports, *changes])
    summary.to_csv(output / "summary.csv", index=False)
    models = list(dict.fromkeys(summary.model)) if len(summary) else []
    sections = [setup_note(config_path, results, options)]
    if merged:
        runs = [f"`{folder}`" + (f" (config `{config}`)" if config else "") for folder, config in merged.items()]
        sections.insert(0, f"Merged from {len(merged)} runs: " + ", ".join(runs) + ".")
    for metric in metrics:
        sections.append(f"## {metric}\n\n" + metric_table(summary, metric, models))
    if "fit_s_mean" in summary:
        sections.append("## fit seconds\n\n" + metric_table(summary, "fit_s", models, digits=0))
    sections.append(
        "Mean ± sample std over seeds (one seed: the value); the mean over datasets is the mean of each model's "
        f"per-dataset means (only models with results on every dataset). `fit seconds`: training plus the one "
        f"validation pass, on the device above. {common.METRICS_NOTE}"
        + (f" {common.RD_NOTE}" if common.RD_LABEL in models else "")
    )
    for metric, prefix in TYPE_PREFIXES.items():
        if by_type := type_tables(summary, prefix):
            name = prefix.removesuffix(" · ")
            name = name[0].upper() + name[1:]
            sections.append(
                f"## {name} by defect type\n\nEach defect type's test images (its folder) together with the good "
                "ones"
                + (": every region of the type weighs the same." if metric == "AUPRO" else ".")
                + "\n\n"
                + "\n\n".join(by_type)
            )
    if options.openvino and metrics:
        sections.append(export_section(results, options.openvino, metrics))
    if curve is not None and len(curve):
        sections.append(curve_section(curve, output / "curve.png"))
    baseline = config.get("baseline")
    if baseline and metrics:
        sections.append(baseline_table(summary, str(baseline), metrics))
    if metrics and len(summary):
        panels = {dataset: summary[summary.dataset == dataset] for dataset in dict.fromkeys(summary.dataset)}
        common.bar_panels(panels, metrics, output / "metrics.png")
        sections.append("![metrics](metrics.png)")
    if heatmaps.write(output / "heatmaps.png", models):
        sections.append(
            "## Heatmaps\n\nA few defective test images per dataset, one defect type after another: image, ground "
            "truth, and each model's map over the image (its first finished job: the first seed unless that one "
            "failed), min-max scaled over the validation set (blank: no result).\n\n![heatmaps](heatmaps.png)"
        )
    failed = results[results.status != "ok"]
    if len(failed):
        rows = failed[["model", "dataset", "seed", "error"]].fillna("").to_numpy()
        sections.append("## Failed jobs\n\n" + common.markdown_table(["model", "dataset", "seed", "error"], rows))
    title = "Benchmark: merged runs" if merged else f"Benchmark `{config_path.stem}`"
    common.write_report(output / "report.md", title, [s for s in sections if s], command)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="benchmark config (anomalib benchmark format)")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="RUN",
        help="instead of running a config: report the output folders of earlier runs as one (e.g. one run per "
        "seed), their results.csv and curve.csv together",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output folder (default: results/benchmarks/<timestamp>-<config>)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="square input size of every model: a labelled CPU shortcut (default: each model's default "
        "pre-processor, 256 px)",
    )
    parser.add_argument(
        "--max-epochs", type=int, default=None, help="epochs of every trained model (PatchCore, PaDiM: always 1)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's seeds")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="run only the model entries of these classes or labels (an exact label: that entry only; "
        "Tdad: TDAD and RD; TDAD: TDAD only)",
    )
    parser.add_argument(
        "--init-arg",
        action="append",
        default=[],
        metavar="CLASS.KEY=VALUE",
        help="set an init_arg of the model entries of a class or label, value read as YAML (repeatable), e.g. "
        "Patchcore.coreset_sampling_ratio=0.01; an exact label selects that entry only (TDAD.margin=0.3: not RD)",
    )
    parser.add_argument(
        "--limit-train", type=int, default=0, help="quick check: train on this many random images (default 0: all)"
    )
    parser.add_argument(
        "--limit-test",
        type=int,
        default=0,
        help="quick check: test on about this many images, both labels kept (default 0: all)",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=None, help="run only these datasets (labels or classes, e.g. Kolektor)"
    )
    parser.add_argument("--root", type=Path, default=None, help="override every dataset's root")
    parser.add_argument("--categories", nargs="+", default=None, help="override the category of datasets with one")
    parser.add_argument("--accelerator", nargs="+", default=None, help="override the accelerators (cpu, cuda)")
    parser.add_argument("--num-workers", type=int, default=None, help="override the data loader workers")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's, from OMP_NUM_THREADS)"
    )
    parser.add_argument(
        "--openvino",
        nargs="+",
        default=[],
        choices=list(EXPORTS),
        help="also export each model to OpenVINO after its test and score the IR on the test set: f32, int8_ptq, "
        "int8_acq (INT8 needs NNCF: pip install '.[int8]')",
    )
    parser.add_argument(
        "--track-every",
        type=int,
        default=0,
        help="validate trained models every N epochs (N must divide their epochs) and report the validation "
        "metrics by epoch: curve.csv, curve.png (default 0: validate once, after the last epoch)",
    )
    parser.add_argument(
        "--rescore",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="after each test, test the trained model again with this init_arg set to each value (YAML, a value or "
        "a list), e.g. score_topk=[0.001,0.01]: an inference setting screened without training again; a row "
        "'<model> · KEY=VALUE' per value, for the models that take KEY (repeatable)",
    )
    parser.add_argument(
        "--save-models",
        action="store_true",
        help="keep each trained model's state dict in models/ of the output (for --from-models)",
    )
    parser.add_argument(
        "--from-models",
        type=Path,
        metavar="FOLDER",
        help="test the models a run with --save-models kept in FOLDER (its models/) instead of training them; "
        "with --rescore, inference settings screened on models trained earlier",
    )
    parser.add_argument(
        "--heatmaps", type=int, default=4, help="defective images per dataset in heatmaps.png (default 4; 0: none)"
    )
    return parser.parse_args(argv)


RUN_FILE = "run.json"  # what the command line set for a run's jobs: read back by --merge


def merge_runs(folders: Sequence[Path], output: Path | None, argv: Sequence[str]) -> int:
    """Write one report of earlier runs' output ``folders`` (``results.csv``, ``curve.csv`` if any) to ``output``.

    A job (model, dataset, seed, accelerator) that failed in one run and finished in another is the finished one (a
    rerun); 2 when a folder is no run, a job finished in two runs, or the runs differ in input size, image limits
    (``run.json``; runs without one, from older versions, by the image counts of each dataset's jobs), or a model's
    epochs or settings (its ``model.*`` columns, e.g. from ``--init-arg``) on a dataset.
    """
    missing = [str(folder) for folder in folders if not (folder / "results.csv").is_file()]
    if missing:
        print("benchmark: no results.csv in\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    runs = [json.loads(path.read_text()) if (path := folder / RUN_FILE).is_file() else {} for folder in folders]
    frames = [pd.read_csv(folder / "results.csv").assign(run=index) for index, folder in enumerate(folders)]
    results = pd.concat(frames, ignore_index=True)
    keys = ["model", "dataset", "seed", "accelerator"]
    done = results[results.status == "ok"]
    twice = done[done.duplicated(keys, keep=False)][keys].drop_duplicates()
    epochs = done.groupby(["model", "dataset"], sort=False).epochs.nunique()
    settings = [column for column in done.columns if column.startswith("model.")]  # e.g. an --init-arg
    variants = done.groupby(["model", "dataset"], sort=False)[settings].nunique(dropna=False).max(axis=1)
    sizes = set(results.image_size.dropna().astype(str))
    limits = {(run["limit_train"], run["limit_test"]) for run in runs if "limit_train" in run}  # runs with run.json
    images = done.groupby("dataset", sort=False)[["train_images", "test_images"]].nunique().max(axis=1)
    problems = [
        f"jobs finished in more than one run: {twice.to_dict('records')}" if len(twice) else "",
        f"input sizes {sizes}" if len(sizes) > 1 else "",
        f"epochs differ for {[' on '.join(pair) for pair in epochs[epochs > 1].index]}" if (epochs > 1).any() else "",
        f"model settings differ for {[' on '.join(pair) for pair in variants[variants > 1].index]}"
        if (variants > 1).any()
        else "",
        f"image limits (--limit-train, --limit-test) {sorted(limits)}" if len(limits) > 1 else "",
        f"the images used on {list(images[images > 1].index)}" if (images > 1).any() else "",
    ]
    if any(problems):
        print(f"benchmark: cannot merge, {'; '.join(p for p in problems if p)}", file=sys.stderr)
        return 2
    # A failed job and its rerun: keep the finished row (or the last failure), in the order of the runs.
    results["finished"] = results.status == "ok"
    kept = results.sort_values(["finished", "run"]).drop_duplicates(keys, keep="last")
    results = results.loc[sorted(kept.index)]
    curves = []
    for index, folder in enumerate(folders):
        if (folder / "curve.csv").is_file():
            curve = pd.read_csv(folder / "curve.csv")
            jobs = results[results.run == index][keys]
            curves.append(curve.merge(jobs, on=[k for k in keys if k in curve.columns]))
    results = results.drop(columns=["run", "finished"])
    config_path = folders[0] / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    size = next(iter(sizes), "default")
    modes = [mode for mode, name in EXPORTS.items() if any(c.startswith(f"{name} · ") for c in results.columns)]
    limit_train, limit_test = next(iter(limits), (0, 0))
    options = Options(
        image_size=None if size == "default" else int(float(size)),
        limit_train=limit_train,
        limit_test=limit_test,
        openvino=tuple(modes),
    )
    output = (output or common.REPO / "results" / "benchmarks" / f"{datetime.now():%Y%m%d-%H%M%S}-merged").resolve()
    output.mkdir(parents=True, exist_ok=True)
    results = results_table(results.to_dict("records"))
    results.to_csv(output / "results.csv", index=False)
    curve = pd.concat(curves, ignore_index=True) if curves else None
    if curve is not None:
        curve.to_csv(output / "curve.csv", index=False)
    command = [str(Path(__file__).resolve().relative_to(common.REPO)), *argv]
    sources = {folder: run.get("config") for folder, run in zip(folders, runs, strict=True)}
    write_outputs(output, config, config_path, results, Heatmaps(), options, command, curve, merged=sources)
    print(f"Wrote {output / 'report.md'}")
    return 0


def rescorings(arguments: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """The ``(key, values)`` pairs of ``--rescore KEY=VALUES`` arguments, ``values`` read as YAML."""
    pairs = []
    for argument in arguments:
        key, sep, values = argument.partition("=")
        if not sep or not key.isidentifier():
            msg = f"--rescore {argument!r}: expected KEY=VALUES, e.g. score_topk=[0.001,0.01]."
            raise ConfigError(msg)
        pairs.append((key, yaml.safe_load(values)))
    return tuple(pairs)


def rescore_values(model: AnomalibModule, key: str, values: Any) -> list[Any]:
    """The values ``--rescore KEY=VALUES`` tests on ``model`` (none if its class does not take ``key``): one per item
    of a list, except a list of plain values for an argument that takes a sequence, which is one value
    (``level_weights=[0.5,1.0]``; two values: ``level_weights=[[1.0,0.5],[0.5,1.0]]``)."""
    if key not in inspect.signature(type(model)).parameters:
        return []
    if not isinstance(values, list):
        return [values]
    try:
        annotation = typing.get_type_hints(type(model).__init__).get(key)
    except (NameError, TypeError):  # some annotation does not resolve: this one as written, a string as no sequence
        annotation = inspect.signature(type(model)).parameters[key].annotation
    plain = not any(isinstance(value, list | dict) for value in values)
    return [values] if plain and takes_sequence(annotation) else values


def takes_sequence(annotation: Any) -> bool:
    """Whether a type ``annotation`` admits a list or tuple (``Sequence[float] | None`` does, ``float`` does not)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(takes_sequence(arm) for arm in typing.get_args(annotation))
    kind = origin or annotation
    return isinstance(kind, type) and issubclass(kind, list | tuple | abc.Sequence) and not issubclass(kind, str)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the config's jobs and write the outputs; returns 1 if any job failed, 2 if none could start."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if (args.config is None) == (args.merge is None):
        print("benchmark: give either --config (run its jobs) or --merge (report earlier runs)", file=sys.stderr)
        return 2
    if args.merge:
        return merge_runs(args.merge, args.output, argv)
    common.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = load_config(args.config, args)
        rescore = rescorings(args.rescore)
    except ConfigError as error:
        print(f"benchmark: {error}", file=sys.stderr)
        return 2
    missing = missing_data(config)
    if missing:
        print("benchmark: no data at\n  " + "\n  ".join(missing) + "\n(set the roots or pass --root)", file=sys.stderr)
        return 2
    try:
        for mode in args.openvino:
            check_nncf(None if mode == "f32" else mode)
    except ModuleNotFoundError as error:
        print(f"benchmark: {error}", file=sys.stderr)
        return 2
    if args.from_models and not args.from_models.is_dir():
        print(f"benchmark: --from-models {args.from_models}: no such folder", file=sys.stderr)
        return 2
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}-{args.config.stem}"
    output = (args.output or common.REPO / "results" / "benchmarks" / stamp).resolve()
    trainer = config.get("trainer") or {}
    options = Options(
        args.image_size,
        args.max_epochs,
        args.limit_train,
        args.limit_test,
        args.heatmaps,
        trainer,
        tuple(args.openvino),
        args.track_every,
        rescore,
        output / "models" if args.save_models else None,
        args.from_models.resolve() if args.from_models else None,
    )
    jobs = expand_jobs(config, options)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    run = {"config": str(args.config), **asdict(options)}
    (output / RUN_FILE).write_text(json.dumps(run, indent=1, default=str), encoding="utf-8")

    results, heatmaps, curve = run_jobs(jobs, output)
    command = [str(Path(__file__).resolve().relative_to(common.REPO)), *argv]
    write_outputs(output, config, args.config, results, heatmaps, options, command, curve)
    failed = int((results.status != "ok").sum())
    print(f"Wrote {output / 'report.md'}" + (f"; {failed} of {len(results)} job(s) FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
