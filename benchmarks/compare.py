"""TDAD against plain reverse distillation and anomalib's PatchCore, STFPM and PaDiM, in one process.

Every model uses the same offline teacher (timm ``tf_efficientnet_lite0``), the same images and the same
input size; each is trained and tested with anomalib's ``Engine`` on an MVTec AD layout dataset (default:
the development set ``../shared/data/magnetic_tile``), once per seed. Writes to ``--output``:

- ``results.csv``: one row per model and seed (image AUROC, pixel AUROC, PRO, fit and test seconds, and the
  pixel AUROC of each defect type);
- ``summary.csv`` and ``report.md``: mean ± std over seeds (overall and per defect type), with the command,
  date, commit and device;
- ``metrics.png``: bars per model and metric;
- ``heatmaps.png``: image | ground truth | TDAD map | best peer's map, for a few defective test images.

Example (smoke run, under a minute on one CPU thread)::

    python benchmarks/compare.py --seeds 0 --max-epochs 1 --train-limit 32 --test-limit 60 --image-size 128
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

MODELS = ["tdad", "rd", "patchcore", "stfpm", "padim"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_data_args(parser)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, help="models to run")
    parser.add_argument(
        "--coreset-ratio",
        type=float,
        default=0.001,
        help="PatchCore coreset sampling ratio. Its greedy selection costs time ~ patches x picks: at 128 px the "
        "802 magnetic_tile images give 205k patches and anomalib's default 0.1 (20.5k picks) took 25 min on 2 CPU "
        "threads; at 256 px (821k patches, ~1.3 s per pick on 1 thread) 0.001 takes ~18 min and 0.1 more than a day",
    )
    parser.add_argument("--heatmaps", type=int, default=6, help="defective test images in heatmaps.png (0: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every model for every seed and write the results; returns 1 if any run failed."""
    args = parse_args(argv)
    output = common.setup_run(args, "compare")
    data = common.DataConfig.from_args(args)
    epochs = common.parse_epochs(args.max_epochs)
    tdad_args = common.parse_key_values(args.tdad_arg)
    jobs = [
        common.Job(
            label=common.LABELS[key],
            seed=seed,
            epochs=epochs(key),
            build=partial(common.build_model, key, args.image_size, args.coreset_ratio, tdad_args),
        )
        for seed in args.seeds  # seed-major: an interrupted run still compares every model
        for key in args.models
    ]

    names, images, masks, maps = [], None, None, {}
    if args.heatmaps:
        names, images, masks = common.defect_examples(common.make_datamodule(data), args.heatmaps, args.image_size)

    def keep(job: common.Job, model: common.AnomalibModule) -> None:
        if images is not None and job.seed == args.seeds[0]:
            maps[job.label] = common.predict_maps(model, images)

    results = common.run_jobs(jobs, data, output, args.accelerator, keep)
    metrics = list(common.METRICS.values())
    summary = common.summarize(results, [*metrics, "fit_s", *common.type_columns(results)])
    summary.to_csv(output / "summary.csv", index=False)
    title = f"{args.category}, {args.image_size} px, {len(args.seeds)} seed(s)"
    common.bar_plot(summary, metrics, output / "metrics.png", title)

    epoch_list = ", ".join(f"{common.LABELS[key]} {epochs(key)}" for key in args.models)
    sections = [
        common.data_note(args, results)
        + f" Teacher `{common.TEACHER}` for every model: levels {', '.join(common.TDAD_LAYERS)} for TDAD and RD "
        f"(unless overridden below), {', '.join(common.PEER_LAYERS)} for STFPM and PaDiM "
        f"({common.PADIM_FEATURES} features); {', '.join(common.PATCHCORE_LAYERS)} for PatchCore "
        f"(coreset ratio {args.coreset_ratio}). Epochs: {epoch_list}."
        + (f" Extra TDAD arguments: `{tdad_args}`." if tdad_args else ""),
        common.summary_table(summary, metrics, extra=["fit_s"]),
        (
            f"Mean ± sample std over seeds {args.seeds}; `fit_s` includes one validation pass over the test "
            f"images. {common.METRICS_NOTE} {common.RD_NOTE}"
        ),
        common.type_table(summary),
        "![metrics](metrics.png)",
    ]
    peers = summary[summary.model != "TDAD"].sort_values("image AUROC_mean", ascending=False)
    if "TDAD" in maps and len(peers) and peers.model.iloc[0] in maps:
        best = peers.model.iloc[0]
        shown = {"TDAD": maps["TDAD"], f"{best} (best peer)": maps[best]}
        common.heatmap_sheet(names, images, masks, shown, output / "heatmaps.png")
        sections.append(
            f"Best peer by mean image AUROC: {best}. Maps of seed {args.seeds[0]}, each scaled to [0, 1] by its "
            "model's minimum and maximum over the test set.\n\n![heatmaps](heatmaps.png)"
        )
    return common.finish_report(output, f"TDAD vs peers on {args.category}", sections, results)


if __name__ == "__main__":
    sys.exit(main())
