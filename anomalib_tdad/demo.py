"""A small MVTec-layout dataset made from real photographs that scikit-image ships, and the demo job.

``make_demo_dataset`` crops a real texture photograph (brick, gravel or grass, from
``skimage.data``) into defect-free training and test images, and plants defects unlike TDAD's
synthetic ones -- long flat-coloured scratches, holes and smudges (local blur) -- with pixel masks, in
anomalib's MVTec AD layout. ``run_demo`` trains TDAD on it with anomalib's Engine, tests it and
writes metrics and heatmaps. No download, no GPU.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

TEXTURES = ("brick", "gravel", "grass")
DEFECTS = ("scratch", "hole", "smudge")


@dataclass
class DemoSplit:
    """Number of images per split of the demo dataset."""

    train: int = 120
    test_good: int = 20
    test_per_defect: int = 10


def _texture(name: str) -> Image.Image:
    """The named texture photograph from scikit-image, as greyscale PIL image."""
    from skimage import data

    if name not in TEXTURES:
        msg = f"Unknown texture {name!r}; choose one of {TEXTURES}."
        raise ValueError(msg)
    return Image.fromarray(getattr(data, name)()).convert("L")


def _crops(
    texture: Image.Image, rows: tuple[int, int], count: int, crop: int, size: int, rng: np.random.Generator
) -> list[Image.Image]:
    """Random ``crop``-pixel crops (with random flips) whose top edge lies in ``rows``, resized to ``size``."""
    width = texture.width
    images = []
    for _ in range(count):
        top = int(rng.integers(rows[0], rows[1] - crop + 1))
        left = int(rng.integers(0, width - crop + 1))
        image = texture.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        images.append(image)
    return images


def plant_defect(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Return ``image`` with one defect of ``kind`` and its binary mask (255 = defect)."""
    size = image.width
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    center = rng.uniform(0.25, 0.75, size=2) * size
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.15, 0.3) * size
        offset = np.array([np.cos(angle), np.sin(angle)]) * half
        start, end = center - offset, center + offset
        draw.line([tuple(start), tuple(end)], fill=255, width=max(2, size // 64))
        value = 235 if rng.random() < 0.5 else 20
        defective = Image.composite(Image.new("L", image.size, value), image, mask)
    elif kind == "hole":
        radius = rng.uniform(0.04, 0.08) * size * np.array([1.0, rng.uniform(0.6, 1.0)])
        draw.ellipse([tuple(center - radius), tuple(center + radius)], fill=255)
        soft = mask.filter(ImageFilter.GaussianBlur(1.5))
        defective = Image.composite(Image.new("L", image.size, 10), image, soft)
    elif kind == "smudge":
        radius = rng.uniform(0.08, 0.14) * size
        draw.ellipse([tuple(center - radius), tuple(center + radius)], fill=255)
        blurred = image.filter(ImageFilter.GaussianBlur(size / 40))
        defective = Image.composite(blurred, image, mask)
    else:
        msg = f"Unknown defect {kind!r}; choose one of {DEFECTS}."
        raise ValueError(msg)
    return defective, mask


def make_demo_dataset(
    root: str | Path,
    category: str = "brick",
    split: DemoSplit | None = None,
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write the demo dataset to ``root/category`` in MVTec AD layout; returns that folder.

    Training and test crops come from disjoint bands of the photograph, so test images are unseen.
    """
    split = split or DemoSplit()
    rng = np.random.default_rng(seed)
    texture = _texture(category)
    crop = texture.height // 4
    boundary = texture.height - crop  # rows above: training crops; the last band: test crops
    folder = Path(root) / category

    def save(image: Image.Image, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)

    for index, image in enumerate(_crops(texture, (0, boundary), split.train, crop, image_size, rng)):
        save(image, folder / "train" / "good" / f"{index:03d}.png")
    test_count = split.test_good + split.test_per_defect * len(DEFECTS)
    test_images = _crops(texture, (boundary, texture.height), test_count, crop, image_size, rng)
    for index, image in enumerate(test_images[: split.test_good]):
        save(image, folder / "test" / "good" / f"{index:03d}.png")
    for number, kind in enumerate(DEFECTS):
        start = split.test_good + number * split.test_per_defect
        for index, image in enumerate(test_images[start : start + split.test_per_defect]):
            defective, mask = plant_defect(image, kind, rng)
            save(defective, folder / "test" / kind / f"{index:03d}.png")
            save(mask, folder / "ground_truth" / kind / f"{index:03d}_mask.png")
    return folder


def run_demo(output: str | Path = "results/demo", category: str = "brick", max_epochs: int = 12, seed: int = 0) -> dict:
    """Make the demo dataset, train and test TDAD on it; returns the test metrics.

    Writes ``output/data`` (the dataset), anomalib's results with heatmap images under
    ``output/Tdad``, and ``output/metrics.json``.
    """
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_tdad import Tdad

    output = Path(output)
    make_demo_dataset(output / "data", category=category, seed=seed)
    seed_everything(seed, workers=True)
    datamodule = MVTecAD(root=output / "data", category=category, train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(max_epochs=max_epochs, default_root_dir=output, logger=False, enable_checkpointing=True)
    model = Tdad()
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    metrics = {name: round(float(value), 4) for name, value in metrics.items()}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
