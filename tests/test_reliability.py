"""Bad input gets a clear error naming what is wrong, or is handled correctly -- never a silent wrong result.

Each test damages a copy of the tiny dataset and pins the exact behaviour: the plugin's own checks
(``anomalib_tdad.checks``, ``Tdad.setup``/``on_load_checkpoint``, ``TdadModel``'s minimum input size)
or, where anomalib already raises a clear error, anomalib's.
"""

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD
from conftest import SIZE, Trained, mvtec_args, quiet_engine, run_anomalib, tiny_datamodule, tiny_model, torch_threads
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_tdad import Tdad, TdadModel
from anomalib_tdad.checks import InvalidDatasetError
from anomalib_tdad.models.tdad.lightning_model import IncompatibleCheckpointError


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread for the whole module (module fixtures included): its predictions are compared exactly."""
    with torch_threads(1):
        yield


@pytest.fixture
def data(tiny_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset, free to damage."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    return root


@pytest.fixture(scope="module")
def checkpoint(trained: Trained) -> Path:
    """A Lite0 Tdad checkpoint trained briefly on brick images (read-only for the tests)."""
    return trained.checkpoint


def fit(root: Path | MVTecAD | Folder, path: Path, category: str = "brick", size: int = SIZE) -> None:
    """Fit a tiny default TDAD for one epoch on ``root/category`` (or a datamodule), writing under ``path``."""
    datamodule = root if isinstance(root, MVTecAD | Folder) else tiny_datamodule(root, category=category)
    quiet_engine(path).fit(tiny_model(size), datamodule=datamodule)


def fit_and_predict(root: Path, path: Path, size: int | tuple[int, int] = SIZE) -> list:
    seed_everything(0)
    model, datamodule = tiny_model(size), tiny_datamodule(root)
    engine = quiet_engine(path, limit_train_batches=2)
    engine.fit(model, datamodule=datamodule)
    return engine.predict(model, datamodule=datamodule)


def images_of(root: Path) -> list[Path]:
    """Every image (not mask) of the dataset."""
    return sorted(p for p in root.rglob("*.png") if "ground_truth" not in p.parts)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed ``anomalib`` command on one thread; the caller checks the exit status."""
    return run_anomalib(*args, cwd=cwd, check=False, threads=1)


def predict_cli(
    checkpoint: Path, data: Path, results: Path, *model_args: str, cwd: Path
) -> subprocess.CompletedProcess:
    """``anomalib predict`` of ``data`` with TDAD (plus ``model_args``) from ``checkpoint``, writing to ``results``."""
    return run_cli(
        "predict",
        "--model",
        "Tdad",
        *model_args,
        "--ckpt_path",
        str(checkpoint),
        "--data",
        str(data),
        "--default_root_dir",
        str(results),
        cwd=cwd,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


# ---------------------------------------------------------------------------------------------- dataset location


def test_missing_root_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped root of a custom category: anomalib's download finds nothing, then the folder is named."""
    monkeypatch.setattr("anomalib.data.datamodules.image.mvtecad.download_and_extract", lambda *_: None)
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"Dataset folder {root / 'brick'} does not exist\. The root folder"):
        fit(root, tmp_path)


def test_missing_root_offline_names_the_folder_not_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, anomalib's MVTec AD download fails at once; the error is the folder and the fix, not the network."""

    def offline(*_: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("anomalib.data.datamodules.image.mvtecad.download_and_extract", offline)
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"{root / 'brick'} does not exist.*check --data.root") as error:
        fit(root, tmp_path)
    assert isinstance(error.value.__context__, OSError)  # the download's own error is kept, chained


def test_missing_category_lists_the_categories_found(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"brik does not exist\. Categories found in .*: \['brick'\]"):
        fit(tiny_root, tmp_path, category="brik")


def test_missing_mvtec_category_is_left_to_anomalibs_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For one of MVTec AD's own categories anomalib downloads the dataset (its documented behaviour).

    Guards the plugin's dataset check: it refuses a missing root or category before anomalib's download, but
    must leave that download alone for MVTec AD's own categories (the README promises both).
    """

    class DownloadStarted(Exception):  # noqa: N818
        pass

    def download(root: Path, info: object) -> None:
        raise DownloadStarted(root)

    monkeypatch.setattr("anomalib.data.datamodules.image.mvtecad.download_and_extract", download)
    with pytest.raises(DownloadStarted, match="nowhere"):
        fit(tmp_path / "nowhere", tmp_path, category="bottle")


def test_missing_folder_dataset_is_anomalibs_clear_error(tmp_path: Path) -> None:
    """The plugin's check runs before anomalib's datamodule set-up; for a Folder dataset it must not hide
    anomalib's own clear error with one of its own or a crash (the check knows MVTec layouts only)."""
    datamodule = Folder(name="parts", root=tmp_path / "nowhere", normal_dir="good", num_workers=0)
    with pytest.raises(FileNotFoundError, match=rf"Path does not exist: {tmp_path / 'nowhere' / 'good'}"):
        fit(datamodule, tmp_path)


def test_empty_train_good_is_a_clear_error(data: Path, tmp_path: Path) -> None:
    for image in (data / "brick" / "train" / "good").iterdir():
        image.unlink()
    train_good = data / "brick" / "train" / "good"
    with pytest.raises(InvalidDatasetError, match=rf"training split .* has no images.* belong in {train_good}"):
        fit(data, tmp_path)


# ---------------------------------------------------------------------------------------------- unreadable files


def test_truncated_png_in_train_is_named_before_training(data: Path, tmp_path: Path) -> None:
    broken = data / "brick" / "train" / "good" / "003.png"
    truncate(broken)
    with pytest.raises(InvalidDatasetError, match=rf"{broken}: \[train\] cannot read this image") as error:
        fit(data, tmp_path / "results")
    assert "1 problem(s)" in str(error.value)
    assert not list(tmp_path.rglob("*.ckpt"))  # failed before a single step


def test_corrupted_png_in_test_is_named_at_fit_and_at_test(data: Path, tmp_path: Path) -> None:
    broken = data / "brick" / "test" / "scratch" / "001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    model, datamodule = tiny_model(), tiny_datamodule(data)
    engine = quiet_engine(tmp_path)
    # at fit: ``anomalib train`` tests right after fitting, so a bad test image must not wait for the test stage
    with pytest.raises(InvalidDatasetError, match=rf"{broken}: \[(val|test)\] cannot read this image"):
        engine.fit(model, datamodule=datamodule)
    with pytest.raises(InvalidDatasetError, match=rf"{broken}: \[test\] cannot read this image"):
        engine.test(model, datamodule=datamodule)


# ---------------------------------------------------------------------------------------------- image formats


@pytest.fixture(scope="module")
def grayscale_predictions(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    assert {Image.open(p).mode for p in images_of(tiny_root)} == {"L"}  # the tiny dataset is 8-bit grayscale
    return fit_and_predict(tiny_root, tmp_path_factory.mktemp("grayscale"))


def to_rgb(path: Path) -> None:
    Image.open(path).convert("RGB").save(path)


def to_rgba(path: Path) -> None:
    Image.open(path).convert("RGBA").save(path)


def to_rgb16(path: Path) -> None:
    gray = np.asarray(Image.open(path)).astype(np.uint16) * 257  # 8-bit v -> 16-bit v * 257, same brightness
    cv2.imwrite(str(path), np.stack([gray] * 3, axis=-1))


@pytest.mark.parametrize("convert", [to_rgb, to_rgba, to_rgb16], ids=["rgb", "rgba", "rgb16"])
def test_image_formats_give_the_same_scores_as_grayscale(
    data: Path, tmp_path: Path, grayscale_predictions: list, convert
) -> None:
    for path in images_of(data):
        convert(path)
    if convert is to_rgb16:  # IHDR: bit depth 16, colour type 2 (RGB)
        assert all(path.read_bytes()[24:26] == bytes([16, 2]) for path in images_of(data))
    predictions = fit_and_predict(data, tmp_path)
    for converted, grayscale in zip(predictions, grayscale_predictions, strict=True):
        assert torch.equal(converted.pred_score, grayscale.pred_score)
        assert torch.equal(converted.anomaly_map, grayscale.anomaly_map)


def test_16bit_grayscale_png_is_refused_with_a_fix(data: Path, tmp_path: Path) -> None:
    """anomalib's reader clips 16-bit grayscale to white (a silent blank image), so the plugin refuses it."""
    path = data / "brick" / "train" / "good" / "005.png"
    Image.fromarray(np.asarray(Image.open(path)).astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode == "I;16"
    with pytest.raises(InvalidDatasetError, match=rf"{path}: \[train\] I;16 .* clips every value above 255 .* Convert"):
        fit(data, tmp_path)


# ---------------------------------------------------------------------------------------------- image sizes


def test_non_square_images_work(data: Path, tmp_path: Path) -> None:
    for path in data.rglob("*.png"):
        Image.open(path).resize((100, 50), Image.NEAREST).save(path)
    predictions = fit_and_predict(data, tmp_path, size=(48, 96))
    for batch in predictions:
        assert batch.anomaly_map.shape[-2:] == (48, 96)
        assert torch.isfinite(batch.pred_score).all()
        assert torch.isfinite(batch.anomaly_map).all()


def test_very_small_images_work(data: Path, tmp_path: Path) -> None:
    for path in data.rglob("*.png"):
        Image.open(path).resize((9, 7), Image.NEAREST).save(path)
    predictions = fit_and_predict(data, tmp_path)  # the pre-processor resizes them to the model input
    assert sum(len(batch.pred_score) for batch in predictions) == 10
    assert all(torch.isfinite(batch.pred_score).all() for batch in predictions)


def test_model_input_below_the_backbone_minimum_names_it(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"32x32 px is too small .* tf_efficientnet_lite0 .* at least 33 px"):
        fit(tiny_root, tmp_path, size=32)


@pytest.mark.parametrize(
    ("backbone", "layers", "minimum"),
    [
        ("tf_efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), 33),
        ("tf_efficientnet_lite0", ("blocks.2", "blocks.4", "blocks.6"), 33),
        ("resnet18", ("layer2", "layer3", "layer4"), 33),
        ("wide_resnet50_2", ("layer1", "layer2", "layer3"), 33),
    ],
)
def test_minimum_input_size_is_exact(backbone: str, layers: tuple[str, ...], minimum: int) -> None:
    model = TdadModel(backbone, layers, pre_trained=False)
    assert model.min_input_size == minimum
    for training in (True, False):  # a batch of one image is the hardest case (BatchNorm on the embedding)
        model.train(training)
        model(torch.rand(1, 3, minimum, 3 * minimum))
        with pytest.raises(ValueError, match=rf"at least {minimum} px"):
            model(torch.rand(1, 3, minimum - 1, 3 * minimum))


# ---------------------------------------------------------------------------------------------- masks


def test_mask_whose_size_differs_from_its_image_is_named(data: Path, tmp_path: Path) -> None:
    mask = data / "brick" / "ground_truth" / "scratch" / "000_mask.png"
    Image.open(mask).resize((64, 48), Image.NEAREST).save(mask)
    image = data / "brick" / "test" / "scratch" / "000.png"
    match = rf"{mask}: \[test\] mask is 64x48 px but its image {image} is 64x64 px"
    with pytest.raises(InvalidDatasetError, match=match):
        quiet_engine(tmp_path).test(tiny_model(), datamodule=tiny_datamodule(data))


# ---------------------------------------------------------------------------------------------- anomalib predict


def test_predict_folder_skips_non_image_files(tiny_root: Path, tmp_path: Path, checkpoint: Path) -> None:
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    good = tiny_root / "brick" / "test" / "good"
    for name in ("000.png", "001.png"):
        shutil.copy(good / name, folder / name)
    shutil.copy(good / "002.png", folder / "sub" / "002.png")
    (folder / "notes.txt").write_text("shift 2\n")
    (folder / "Thumbs.db").write_bytes(os.urandom(64))
    (folder / ".DS_Store").write_bytes(os.urandom(64))
    (folder / "readme").write_text("no extension\n")
    result = predict_cli(checkpoint, folder, tmp_path / "results", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    written = sorted(p.relative_to(tmp_path / "results").parts[-2:] for p in (tmp_path / "results").rglob("*.png"))
    assert written == [("incoming", "000.png"), ("incoming", "001.png"), ("sub", "002.png")]


def test_predict_folder_with_a_broken_image_names_it(tiny_root: Path, tmp_path: Path, checkpoint: Path) -> None:
    """A non-image with an image extension: anomalib's reader names the file.

    Guards why the plugin's data check skips the predict stage: it relies on this error naming the file.
    """
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(tiny_root / "brick" / "test" / "good" / "000.png", folder / "000.png")
    (folder / "001.png").write_text("not an image\n")
    result = predict_cli(checkpoint, folder, tmp_path / "results", cwd=tmp_path)
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert f"UnidentifiedImageError: cannot identify image file '{folder / '001.png'}'" in output


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_from_another_backbone_is_refused_by_name(tiny_root: Path, tmp_path: Path, checkpoint: Path) -> None:
    resnet = {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"], "pre_trained": False}
    before = sha256(checkpoint)
    match = r"backbone: checkpoint 'tf_efficientnet_lite0', this model 'resnet18'"
    with pytest.raises(IncompatibleCheckpointError, match=match):
        quiet_engine(tmp_path).predict(
            tiny_model(**resnet), datamodule=tiny_datamodule(tiny_root), ckpt_path=checkpoint
        )
    # load_from_checkpoint writes overrides into the saved hyper-parameters, so the weights' shapes are compared
    with pytest.raises(IncompatibleCheckpointError, match=r"weights do not fit this Tdad model \(backbone 'resnet18'"):
        Tdad.load_from_checkpoint(checkpoint, **resnet)
    assert Tdad.load_from_checkpoint(checkpoint).hparams.backbone == "tf_efficientnet_lite0"  # its own settings load
    assert sha256(checkpoint) == before


def test_cli_checkpoint_from_another_backbone_is_refused_and_nothing_written(
    tiny_root: Path, tmp_path: Path, checkpoint: Path
) -> None:
    before = sha256(checkpoint)
    results = tmp_path / "results"
    model_args = (
        "--model.backbone",
        "resnet18",
        "--model.layers",
        "[layer1,layer2,layer3]",
        "--model.pre_trained",
        "false",
    )
    result = predict_cli(checkpoint, tiny_root / "brick" / "test" / "good", results, *model_args, cwd=tmp_path)
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    named = re.search(
        r"IncompatibleCheckpointError: The checkpoint does not fit this Tdad model \(backbone: checkpoint "
        r"'tf_efficientnet_lite0', this model 'resnet18'; layers: checkpoint \[([^\]]+)\]",
        output,
    )
    assert named, output[-3000:]
    layers = [name.strip(" '") for name in named.group(1).split(",")]
    assert f'--model.backbone tf_efficientnet_lite0 --model.layers "[{",".join(layers)}]"' in output
    # the settings the error names are the checkpoint's: a model built with them loads it
    Tdad.load_from_checkpoint(checkpoint, backbone="tf_efficientnet_lite0", layers=layers)
    assert sha256(checkpoint) == before
    assert not list(results.rglob("*.png")) and not list(results.rglob("*.ckpt"))


def test_cli_truncated_checkpoint_is_a_clear_error_and_nothing_overwritten(
    tiny_root: Path, tmp_path: Path, checkpoint: Path
) -> None:
    """torch names the corruption and Lightning the file; resuming from it trains nothing and overwrites nothing."""
    results = tmp_path / "results"
    shutil.copytree(checkpoint.parents[2], results / "previous")  # an earlier run's version folder, with model.ckpt
    previous = {p: sha256(p) for p in results.rglob("*") if p.is_file()}
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 3])
    result = run_cli(
        "train",
        "--model",
        "Tdad",
        *mvtec_args(tiny_root),
        "--data.num_workers",
        "0",
        "--trainer.max_epochs",
        "1",
        "--ckpt_path",
        str(truncated),
        "--default_root_dir",
        str(results),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert f"Restoring states from the checkpoint path at {truncated}" in output
    assert "your checkpoint file is corrupted" in output
    assert {p: sha256(p) for p in previous} == previous
    assert [p for p in results.rglob("*.ckpt")] == [p for p in previous if p.suffix == ".ckpt"]
