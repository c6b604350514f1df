"""``anomalib-tdad``: the demo job and the demo dataset. Training and the rest go through ``anomalib``."""

import argparse
import json
from pathlib import Path

from anomalib_tdad.demo import TEXTURES, make_demo_dataset, run_demo


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``anomalib-tdad`` command."""
    parser = argparse.ArgumentParser(prog="anomalib-tdad", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="make the demo dataset, train and test TDAD, write metrics and heatmaps")
    demo.add_argument("--output", type=Path, default=Path("results/demo"))
    demo.add_argument("--texture", choices=TEXTURES, default="brick")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    dataset = commands.add_parser("make-dataset", help="write the demo dataset in MVTec AD layout")
    dataset.add_argument("root", type=Path)
    dataset.add_argument("--texture", choices=TEXTURES, default="brick")
    dataset.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "make-dataset":
        folder = make_demo_dataset(args.root, category=args.texture, seed=args.seed)
        print(f"Wrote {folder} (use --data.root {args.root} --data.category {args.texture})")
        return
    metrics = run_demo(args.output, category=args.texture, max_epochs=args.epochs, seed=args.seed)
    print(json.dumps(metrics, indent=2))
    print(f"Metrics: {args.output / 'metrics.json'}; heatmaps: {args.output / 'Tdad'} (images/ folder)")


if __name__ == "__main__":
    main()
