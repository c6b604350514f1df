"""Ablation of TDAD's three distillations on the development set: GKD, GKD+SCD, GKD+DMD, GKD+SCD+DMD.

Each loss configuration is TDAD with the other weights set to 0, trained and tested with anomalib's
``Engine`` on the same images once per seed (default data: ``../shared/data/magnetic_tile``). Writes to
``--output``: ``results.csv`` (one row per configuration and seed), ``summary.csv`` and ``report.md``
(mean ± std of image AUROC, pixel AUROC and PRO, and the change against GKD only), ``metrics.png``.

Example (smoke run)::

    python benchmarks/ablation.py --seeds 0 --max-epochs 1 --train-limit 32 --test-limit 60 --image-size 128
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CONFIGS = {  # (lambda_gkd, lambda_scd, lambda_dmd)
    "GKD": (1.0, 0.0, 0.0),
    "GKD+SCD": (1.0, 1.0, 0.0),
    "GKD+DMD": (1.0, 0.0, 1.0),
    "GKD+SCD+DMD": (1.0, 1.0, 1.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_data_args(parser)
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="loss configurations to run"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration for every seed and write the results; returns 1 if any run failed."""
    args = parse_args(argv)
    output = common.setup_run(args, "ablation")
    data = common.DataConfig.from_args(args)
    epochs = common.parse_epochs(args.max_epochs)("tdad")
    tdad_args = common.parse_key_values(args.tdad_arg)
    jobs = []
    for seed in args.seeds:  # seed-major: an interrupted run still compares every configuration
        for name in args.configs:
            weights = dict(zip(("lambda_gkd", "lambda_scd", "lambda_dmd"), CONFIGS[name], strict=True))
            build = partial(common.build_model, "tdad", args.image_size, tdad_args={**tdad_args, **weights})
            jobs.append(common.Job(label=name, seed=seed, epochs=epochs, build=build))

    results = common.run_jobs(jobs, data, output, args.accelerator).rename(columns={"model": "losses"})
    results.to_csv(output / "results.csv", index=False)
    metrics = list(common.METRICS.values())
    summary = common.summarize(results, [*metrics, "fit_s"], by="losses")
    summary.to_csv(output / "summary.csv", index=False)
    title = f"TDAD ablation, {args.category}, {len(args.seeds)} seed(s)"
    common.bar_plot(summary, metrics, output / "metrics.png", title, by="losses")

    weight_list = ", ".join(f"{name} {CONFIGS[name]}" for name in args.configs)
    sections = [
        common.data_note(args, results)
        + f" TDAD on `{common.TEACHER}` ({', '.join(common.TDAD_LAYERS)}), {epochs} epochs. Weights "
        f"(λ_GKD, λ_SCD, λ_DMD): {weight_list}." + (f" Extra TDAD arguments: `{tdad_args}`." if tdad_args else ""),
        common.summary_table(summary, metrics, by="losses", extra=["fit_s"]),
        f"Mean ± sample std over seeds {args.seeds}. {common.METRICS_NOTE}",
    ]
    if "GKD" in set(summary.losses):
        base = summary.set_index("losses").loc["GKD"]
        rows = [
            [row.losses, *(f"{row[f'{m}_mean'] - base[f'{m}_mean']:+.3f}" for m in metrics)]
            for _, row in summary.iterrows()
            if row.losses != "GKD"
        ]
        sections.append("Change of the mean against GKD only:\n\n" + common.markdown_table(["losses", *metrics], rows))
    sections.append("![metrics](metrics.png)")
    return common.finish_report(output, f"TDAD loss ablation on {args.category}", sections, results, by="losses")


if __name__ == "__main__":
    sys.exit(main())
