"""Run an ``anomalib benchmark`` config, check that every job produced a result, and summarize it.

Runs anomalib's own benchmark pipeline (``anomalib.pipelines.Benchmark``) in this process, with three
changes made here, not in anomalib:

- results are collected with the union of all jobs' config keys (anomalib 2.7 uses the first job's keys
  and crashes, after all training and with exit code 0, when models have different ``init_args``);
- ``PL_TRAINER_MAX_EPOCHS`` is set from ``--max-epochs`` (anomalib's benchmark Engine sets no epochs, so
  TDAD, ReverseDistillation and STFPM would otherwise train Lightning's default of 1000);
- every model is tested with the benchmark metrics of ``common.make_evaluator`` (adds PRO), and its scores
  are min-max scaled before them, as ``common.MinMaxPostProcessor`` explains (anomalib's threshold-centred,
  clamped scaling ties scores and shifts AUROC).

Writes to ``--output``: ``config.yaml`` (the config as run), ``results.csv`` (one row per job),
``report.md`` (one table per metric: category x model, with the mean), ``metrics.png``, and anomalib's
own ``runs/`` folder with its log. Exits 1 when a job is missing from the results.

Example::

    python benchmarks/run_benchmark.py --config benchmarks/mvtec_lite0_offline.yaml \\
        --root ./datasets/MVTecAD --max-epochs 50
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from argparse import Namespace
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from anomalib.pipelines import Benchmark
from anomalib.pipelines.benchmark.job import BenchmarkJob
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="anomalib benchmark config (YAML)")
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="epochs of models that set none (default: $PL_TRAINER_MAX_EPOCHS, else 10)",
    )
    parser.add_argument("--root", type=Path, default=None, help="override data.init_args.root")
    parser.add_argument("--categories", nargs="+", default=None, help="override the category grid")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seed (several: a grid)")
    parser.add_argument("--accelerator", nargs="+", default=None, help="override the accelerators (cpu, cuda)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output folder (default: results/benchmarks/<timestamp>-<config name>)",
    )
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config with the command-line overrides applied and the data root made absolute."""
    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    bench = config["benchmark"]
    data_args = bench["data"].setdefault("init_args", {})
    if args.root is not None:
        data_args["root"] = str(args.root)
    data_args["root"] = str(Path(data_args.get("root", "./datasets/MVTecAD")).resolve())
    if args.categories:
        data_args["category"] = {"grid": list(args.categories)}
    if args.seeds:
        bench["seed"] = {"grid": list(args.seeds)} if len(args.seeds) > 1 else args.seeds[0]
    if args.accelerator:
        config["accelerator"] = list(args.accelerator)
    return config


def expected_jobs(config: dict[str, Any]) -> pd.DataFrame:
    """One row (model label, category, seed) per job the config asks for, per accelerator."""
    rows = [
        {
            "model": common.model_label(job["model"]["class_path"], job["model"].get("init_args") or {}),
            "category": job["data"]["init_args"]["category"],
            "seed": job["seed"],
        }
        for job in get_iterator_from_grid_dict(config["benchmark"])
    ]
    accelerators = config["accelerator"] if isinstance(config["accelerator"], list) else [config["accelerator"]]
    return pd.DataFrame(rows * len(accelerators))


def _missing(value: Any) -> bool:
    """Whether a cell of the union of config keys is empty (a job without that key)."""
    return isinstance(value, float) and math.isnan(value)


def label_results(results: pd.DataFrame) -> pd.DataFrame:
    """Add ``model`` (table label), ``category`` and the metric names of the reports to anomalib's rows."""
    results = results.copy()
    init_columns = [c for c in results.columns if c.startswith("model.init_args.")]
    results["model"] = [
        common.model_label(
            row["model.class_path"],
            {c.removeprefix("model.init_args."): row[c] for c in init_columns if not _missing(row[c])},
        )
        for _, row in results.iterrows()
    ]
    results["category"] = results["data.init_args.category"]
    return results.rename(columns={key: label for key, label in common.METRICS.items() if key in results})


def patch_anomalib(captured: list[pd.DataFrame]) -> None:
    """Make the changes the module docstring lists (to this process's anomalib classes only).

    ``captured`` receives the collected results.
    """
    save = BenchmarkJob.save

    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        return pd.DataFrame(results)

    def save_and_capture(result: pd.DataFrame) -> None:
        captured.append(result)
        save(result)

    BenchmarkJob.collect = staticmethod(collect)
    BenchmarkJob.save = staticmethod(save_and_capture)
    common.AnomalibModule.configure_evaluator = staticmethod(common.make_evaluator)
    for name in ("_normalize", "normalized_image_threshold", "normalized_pixel_threshold"):
        setattr(common.PostProcessor, name, common.MinMaxPostProcessor.__dict__[name])


def missing_jobs(expected: pd.DataFrame, results: pd.DataFrame) -> pd.Series:
    """How many jobs of each (model, category, seed) are missing from ``results``."""
    wanted = expected.astype(str).value_counts()
    done = results[["model", "category", "seed"]].astype(str).value_counts().reindex(wanted.index, fill_value=0)
    missing = (wanted - done).clip(lower=0)
    return missing[missing > 0]


def metric_tables(results: pd.DataFrame, metrics: list[str]) -> list[str]:
    """One Markdown table per metric: a row per category and the mean row, a column per model."""
    sections = []
    for metric in metrics:
        table = results.pivot_table(index="category", columns="model", values=metric, aggfunc="mean", sort=False)
        table.loc["mean"] = table.mean()
        rows = [[name, *("—" if pd.isna(v) else f"{v:.3f}" for v in values)] for name, values in table.iterrows()]
        sections.append(f"## {metric}\n\n" + common.markdown_table(["category", *table.columns], rows))
    return sections


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the reports; returns 1 when jobs are missing from the results."""
    args = parse_args(argv)
    common.quiet()
    config = load_config(args)
    root = Path(config["benchmark"]["data"]["init_args"]["root"])
    expected = expected_jobs(config)
    absent = sorted({category for category in expected.category if not (root / category / "train").is_dir()})
    if absent:
        print(f"No data for categories {absent} under {root}; pass --root.", file=sys.stderr)
        return 2
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}-{args.config.stem}"
    output = (args.output or common.REPO / "results" / "benchmarks" / stamp).resolve()
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    epochs = args.max_epochs or int(os.environ.get("PL_TRAINER_MAX_EPOCHS", "10"))
    os.environ["PL_TRAINER_MAX_EPOCHS"] = str(epochs)

    captured: list[pd.DataFrame] = []
    patch_anomalib(captured)
    os.chdir(output)  # anomalib writes runs/ (results, log) under the working folder
    Benchmark().run(Namespace(config=str(output / "config.yaml")))

    empty = pd.DataFrame(columns=["model", "category", "seed"])
    results = label_results(captured[0]) if captured and len(captured[0]) else empty
    results.to_csv(output / "results.csv", index=False)
    missing = missing_jobs(expected, results)
    metrics = [m for m in common.METRICS.values() if m in results]
    sections = [
        (
            f"Config `{args.config}` (as run: `config.yaml`); models that fix no epochs of their own trained for "
            f"{epochs} (PatchCore and PaDiM: 1). {len(results)} of {len(expected)} jobs produced results. "
            f"{common.METRICS_NOTE}"
        ),
        *metric_tables(results, metrics),
    ]
    if metrics:
        title = f"{args.config.stem}: mean over categories and seeds"
        common.bar_plot(common.summarize(results, metrics), metrics, output / "metrics.png", title)
        sections.append("Bars: mean over categories and seeds, error bars: std over them.\n\n![metrics](metrics.png)")
    if common.RD_LABEL in set(results.model):
        sections.append(common.RD_NOTE)
    if len(missing):
        rows = [[*key, count] for key, count in missing.items()]
        table = common.markdown_table(["model", "category", "seed", "jobs"], rows)
        sections.append(f"**Missing results** (failed jobs, see `{output}/runs/pipeline.log`):\n\n{table}")
    common.write_report(output / "report.md", f"anomalib benchmark: {args.config.stem}", sections)
    print(f"Wrote {output / 'report.md'}" + (f"; {int(missing.sum())} job(s) FAILED" if len(missing) else ""))
    return 1 if len(missing) else 0


if __name__ == "__main__":
    sys.exit(main())
