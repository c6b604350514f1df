"""``anomaly_source_path``: the synthetic anomalies are filled with the real textures of a folder (DTD-style)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from anomalib_tdad import Tdad
from anomalib_tdad.models.tdad.corruption import Corruption

SIZE = 64
COLOUR_PHOTOS = ("coffee", "chelsea", "astronaut")  # colour photographs scikit-image ships (offline)


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DTD-like folder (``images/<class>/<name>.jpg``) of colour crops, larger than the model input."""
    root = tmp_path_factory.mktemp("dtd")
    for name in COLOUR_PHOTOS:
        path = root / "images" / name / f"{name}_0001.jpg"
        path.parent.mkdir(parents=True)
        Image.fromarray(getattr(data, name)()[:96, :96]).save(path, quality=95)
    return root


@pytest.fixture(scope="module")
def grey_images() -> torch.Tensor:
    """Eight crops of scikit-image's brick-wall photograph: grey (R = G = B) RGB images in [0, 1]."""
    brick = torch.from_numpy(data.brick().astype(np.float32) / 255)
    crops = [brick[row : row + SIZE, :SIZE] for row in range(0, 8 * SIZE, SIZE)]
    return torch.stack(crops)[:, None].expand(-1, 3, -1, -1).contiguous()


def corrupt(images: torch.Tensor, anomaly_source_path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Perlin anomaly in every image (no scars, no masked patches); pixel space, no normalization. Seeded."""
    torch.manual_seed(0)
    corruption = Corruption(
        anomaly_source_path=anomaly_source_path, perlin_probability=1.0, mask_probability=0.0, scar_probability=0.0
    )
    corrupted, mask = corruption(images)
    return corrupted, mask[:, 0].bool()


def chroma(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel colourfulness ``max(R, G, B) - min(R, G, B)``: 0 for grey."""
    return images.amax(dim=1) - images.amin(dim=1)


def test_anomalies_are_filled_with_the_folders_textures_and_nothing_else_changes(
    textures: Path, grey_images: torch.Tensor
) -> None:
    """Grey images, colour textures: colour inside each anomaly can only come from the folder's images.

    Without the folder anomalib's own noise textures are used, which are grey: the images stay grey.
    """
    corrupted, mask = corrupt(grey_images, textures)
    assert mask.flatten(1).any(dim=1).all()  # every image got an anomaly
    assert torch.equal(corrupted.permute(0, 2, 3, 1)[~mask], grey_images.permute(0, 2, 3, 1)[~mask])
    colour = chroma(corrupted)
    for image_colour, image_mask in zip(colour, mask, strict=True):
        assert image_colour[image_mask].mean() > 0.002  # texture colours in every anomaly (grey: exactly 0)
    assert colour[mask].mean() > 0.02

    corrupted, mask = corrupt(grey_images, None)
    assert mask.flatten(1).any(dim=1).all()
    assert not torch.equal(corrupted, grey_images)
    assert chroma(corrupted).max() < 1e-6


@pytest.mark.parametrize("content", [None, [], ["notes.txt", "readme"]], ids=["missing", "empty", "no-images"])
def test_a_texture_folder_without_images_is_a_clear_error(tmp_path: Path, content: list[str] | None) -> None:
    folder = tmp_path / "dtd"
    if content is not None:
        folder.mkdir()
        for name in content:
            (folder / name).write_text("not a texture\n")
    problem = "is not a folder of texture images" if content is None else "contains no images"
    with pytest.raises(FileNotFoundError, match=rf"anomaly_source_path {folder} {problem}"):
        Corruption(anomaly_source_path=folder)


def test_tdad_hands_anomaly_source_path_to_the_corruption(tmp_path: Path) -> None:
    """The model option reaches the texture check at construction, before any training."""
    folder = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"anomaly_source_path {folder} is not a folder of texture images"):
        Tdad(anomaly_source_path=str(folder), pre_trained=False)


def test_upper_case_texture_extensions_are_named_in_the_error(tmp_path: Path) -> None:
    """anomalib finds only lower-case extensions; the error says so instead of leaving the user guessing."""
    folder = tmp_path / "dtd"
    folder.mkdir()
    (folder / "bricks.JPG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"contains no images.*\.jpg.*lower case only"):
        Corruption(anomaly_source_path=folder)
