"""Input checks that turn bad data into one clear error before training or testing starts.

anomalib reads images lazily, one batch at a time. A broken file then surfaces mid-run as PIL's
``image file is truncated`` (no file name), a mask of the wrong size as ``stack expects each tensor
to be equal size`` -- or, worse, not at all: PIL clips 16-bit greyscale PNGs to white when anomalib
converts them to RGB, so the model silently trains on blank images. :func:`check_datamodule` looks at
every file of the splits a run will use once, up front, and lists *all* the problems with their paths.
It reads PNG headers and checksums (``verify``), not the pixels, so it costs about a millisecond per
PNG; other formats are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

# PIL modes anomalib's ``Image.open(path).convert("RGB")`` maps wrongly: it clips instead of rescaling.
_CLIPPED_MODES = ("I", "F")
_MAX_LISTED = 10


class InvalidDatasetError(ValueError):
    """The data given to TDAD cannot be used as it is; the message says which files and why."""


@dataclass
class _Report:
    """Problems found in one split, as ``(path, reason)`` pairs."""

    split: str
    problems: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        self.problems.append((str(path), reason))


def _read_header(path: str | Path, report: _Report, kind: str) -> tuple[int, int] | None:
    """Check that ``path`` is a readable image; return its ``(width, height)`` or None (problem recorded)."""
    try:
        with Image.open(path) as image:
            size, mode, fmt = image.size, image.mode, image.format
            if fmt == "PNG":
                image.verify()  # walks every chunk and checks its CRC: catches truncation and corruption
            else:
                image.load()
    except FileNotFoundError:
        report.add(path, f"{kind} file does not exist")
        return None
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error ...
        report.add(path, f"cannot read this {kind} ({type(error).__name__}: {error})")
        return None
    if kind == "image" and (mode in _CLIPPED_MODES or mode.startswith("I;16")):
        report.add(
            path,
            f"{mode} (16/32-bit single-channel) image: anomalib reads images with PIL's convert('RGB'), which clips "
            "every value above 255 to white, so the model would see a blank image. Convert it to 8 bits first, "
            "e.g. Image.fromarray((numpy.asarray(Image.open(p)) >> 8).astype('uint8')).save(p) for 16-bit data "
            "(16-bit RGB PNGs are read correctly and need nothing)",
        )
    return size


def check_dataset(dataset: Any, split: str) -> list[tuple[str, str]]:  # noqa: ANN401
    """Problems of one anomalib dataset: unreadable images and masks, masks whose size differs from the image.

    Args:
        dataset: An anomalib dataset with a ``samples`` table (``image_path``, optional ``mask_path``).
        split: Name of the split, for the message.

    Returns:
        ``(path, reason)`` for every problem found; empty when the split is fine.
    """
    report = _Report(split)
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in samples:
        return report.problems
    mask_paths = samples["mask_path"] if "mask_path" in samples else [None] * len(samples)
    for image_path, mask_path in zip(samples["image_path"], mask_paths, strict=True):
        image_size = _read_header(image_path, report, "image")
        if not isinstance(mask_path, str | Path) or not str(mask_path):
            continue
        mask_size = _read_header(mask_path, report, "mask")
        if image_size is not None and mask_size is not None and mask_size != image_size:
            report.add(
                mask_path,
                f"mask is {mask_size[0]}x{mask_size[1]} px but its image {image_path} is "
                f"{image_size[0]}x{image_size[1]} px; anomalib pairs masks with images pixel for pixel. Check that "
                "the mask belongs to this image, then resize it to the image's size (nearest-neighbour)",
            )
    return report.problems


def _describe(datamodule: Any) -> str:  # noqa: ANN401
    """``MVTecAD (category 'brick', root '/data')`` -- what the user configured, for messages."""
    names = [name for name in ("category", "root") if getattr(datamodule, name, None)]
    details = [f"{name} {getattr(datamodule, name)!s}" for name in names]
    return f"{type(datamodule).__name__} ({', '.join(details)})" if details else type(datamodule).__name__


def check_datamodule(datamodule: Any, stage: str) -> None:  # noqa: ANN401
    """Check the splits of an anomalib datamodule that ``stage`` uses; raise one error listing every problem.

    Args:
        datamodule: A set-up anomalib datamodule (``train_data``, ``val_data``, ``test_data``).
        stage: Lightning stage: ``fit`` checks every split (``anomalib train`` tests right after fitting, and a
            bad test image should not surface only after hours of training), ``validate`` validation,
            ``test`` test.

    Raises:
        InvalidDatasetError: The training split is empty, or files cannot be read or do not match.
    """
    splits = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",)}.get(stage, ())
    problems: list[tuple[str, str]] = []
    for split in splits:
        dataset = getattr(datamodule, f"{split}_data", None)
        if dataset is None:
            continue
        if split == "train" and len(dataset) == 0:
            where = ""
            if getattr(datamodule, "root", None) and getattr(datamodule, "category", None):
                folder = Path(datamodule.root) / datamodule.category / "train" / "good"
                where = f" For MVTec AD layout they belong in {folder}."
            msg = (
                f"The training split of {_describe(datamodule)} has no images. TDAD learns from defect-free "
                f"images only and needs at least one.{where}"
            )
            raise InvalidDatasetError(msg)
        problems += [(path, f"[{split}] {reason}") for path, reason in check_dataset(dataset, split)]
    if problems:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        msg = (
            f"{len(problems)} problem(s) in the data of {_describe(datamodule)}; nothing was trained or scored. "
            f"Fix or remove these files:\n{listed}{more}"
        )
        raise InvalidDatasetError(msg)


def check_dataset_exists(datamodule: Any) -> None:  # noqa: ANN401
    """Fail fast when an MVTec AD datamodule points at a category that is neither on disk nor downloadable.

    anomalib's ``MVTecAD.prepare_data`` downloads the whole MVTec AD archive (about 5 GB) whenever
    ``root/category`` is not a folder -- also for a mistyped root or a custom category, where the
    download cannot help and ends in a network error or, after the download, a missing folder. For one
    of MVTec AD's own categories the download is anomalib's documented behaviour and is left alone.

    Raises:
        FileNotFoundError: ``root/category`` does not exist and ``category`` is not an MVTec AD category.
    """
    from anomalib.data import MVTecAD
    from anomalib.data.datasets.image.mvtecad import CATEGORIES

    if not isinstance(datamodule, MVTecAD):
        return
    root, category = Path(datamodule.root), str(datamodule.category)
    if (root / category).is_dir() or category in CATEGORIES:
        return
    if root.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
        hint = f"Categories found in {root}: {found}." if found else f"{root} has no category folder with train/."
    else:
        hint = f"The root folder {root} does not exist either."
    msg = (
        f"Dataset folder {root / category} does not exist. {hint} '{category}' is not an MVTec AD category, so "
        "there is nothing to download: check --data.root and --data.category."
    )
    raise FileNotFoundError(msg)
