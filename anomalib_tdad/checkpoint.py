"""Refuse, by name, a checkpoint whose network does not fit the model it is loaded into.

Without this check a checkpoint of another teacher fails deep inside ``load_state_dict`` with a list
of tensor shapes, or worse, loads with ``strict=False`` into the wrong network.
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

# Hyper-parameters that fix the shapes of the saved weights; a checkpoint only fits a model that agrees on them.
ARCHITECTURE_HPARAMS = ("backbone", "layers", "embedding_dim")


class IncompatibleCheckpointError(ValueError):
    """A checkpoint was trained with another teacher or student architecture than the model it is loaded into."""


def _plain(value: Any) -> Any:  # noqa: ANN401
    """Tuples as lists, so ``("a", "b")`` from Python equals ``["a", "b"]`` from a YAML/checkpoint."""
    return list(value) if isinstance(value, tuple | list) else value


def _cli(value: Any) -> str:  # noqa: ANN401
    """A hyper-parameter as it is written on anomalib's command line: ``"[a,b]"`` for a list."""
    return f'"[{",".join(map(str, value))}]"' if isinstance(value, tuple | list) else str(value)


def check_hyper_parameters(saved: Mapping[str, Any], own: Mapping[str, Any]) -> None:
    """Raise when the checkpoint's architecture hyper-parameters differ from the model's, naming the fix."""
    differences = {
        name: (saved[name], own[name])
        for name in ARCHITECTURE_HPARAMS
        if name in saved and name in own and _plain(saved[name]) != _plain(own[name])
    }
    if not differences:
        return
    listed = "; ".join(
        f"{name}: checkpoint {_plain(old)!r}, this model {_plain(new)!r}" for name, (old, new) in differences.items()
    )
    fix = " ".join(f"--model.{name} {_cli(old)}" for name, (old, _) in differences.items())
    msg = (
        f"The checkpoint does not fit this Tdad model ({listed}). Build the model with the checkpoint's settings "
        f"({fix}), or load it with Tdad.load_from_checkpoint(path), which reads them from the file."
    )
    raise IncompatibleCheckpointError(msg)


def check_shapes(saved: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], model: str) -> None:
    """Raise when tensors of the same name differ in shape (``model`` describes the model, for the message).

    Buffers listed in neither are not compared; the map statistics, whose shape follows the training
    images, resize themselves.
    """
    differing = [name for name, value in saved.items() if name in own and own[name].shape != value.shape]
    differing = [name for name in differing if ".statistics." not in name]
    if differing:
        first = differing[0]
        msg = (
            f"The checkpoint's weights do not fit this Tdad model ({model}): {len(differing)} tensors differ in "
            f"shape, e.g. {first} (checkpoint {list(saved[first].shape)}, this model {list(own[first].shape)}). "
            "It was trained with another backbone, layers or embedding_dim; load it with "
            "Tdad.load_from_checkpoint(path) and no overrides, which reads them from the file."
        )
        raise IncompatibleCheckpointError(msg)


def legacy_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The settings an older checkpoint was trained with where today's defaults differ and it did not save them.

    - ``layers`` and ``embedding_dim``: anomalib-tdad 0.1 to 0.4 saved its defaults as ``None``: the levels at
      strides 8 and 16, and ``max(256, 2 * C_last)`` channels. Later versions save both as they were built.
    - ``scar_probability``: 0 before 0.7, which added the scars, so that a model ``Tdad.load_from_checkpoint``
      builds from such a checkpoint trains on as it was trained.
    """
    from anomalib_tdad.models.tdad.teacher import LEGACY_STRIDES, level_channels, select_layers

    backbone = hparams.get("backbone")
    if backbone is None:
        return {}
    legacy: dict[str, Any] = {}
    layers = hparams.get("layers")
    if layers is None:
        layers = legacy["layers"] = select_layers(backbone, None, LEGACY_STRIDES)[0]
    if hparams.get("embedding_dim") is None:
        legacy["embedding_dim"] = max(256, 2 * level_channels(backbone, layers)[-1])
    if "scar_probability" not in hparams:
        legacy["scar_probability"] = 0.0
    return legacy


_OLD_STATISTICS = re.compile(r"(?P<prefix>.*\.statistics\.)(?P<name>mean|std)_(?P<level>\d+)")


def upgrade_state_dict(state_dict: dict[str, torch.Tensor]) -> None:
    """Rename, in place, the keys of a checkpoint written by anomalib-tdad 0.1 to this version's.

    0.1 kept the map statistics as ``statistics.mean_0``, ``statistics.std_0`` ... and saved the 2-D blur
    kernel, which now follows from ``sigma`` and is not saved.
    """
    for key in list(state_dict):
        if key.endswith("anomaly_map_generator.blur.kernel"):
            del state_dict[key]
        elif match := _OLD_STATISTICS.fullmatch(key):
            state_dict[f"{match['prefix']}levels.{match['level']}.{match['name']}"] = state_dict.pop(key)


def legacy_settings_of(checkpoint_path: str | os.PathLike | IO) -> dict[str, Any]:
    """:func:`legacy_settings` of a checkpoint file (memory-mapped: its weights are not read); empty for a
    stream or a URL, which cannot be read twice."""
    if not isinstance(checkpoint_path, str | os.PathLike) or not Path(checkpoint_path).is_file():
        return {}
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
    return legacy_settings(checkpoint.get("hyper_parameters", {}))


def check_checkpoint(
    checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Both checks on a Lightning checkpoint loaded into a model with ``hparams`` (its ``layers`` and
    ``embedding_dim`` as it built them) and ``state_dict``; an older checkpoint's defaults are read as the ones of its
    version (:func:`legacy_settings`)."""
    own = dict(hparams)
    saved = checkpoint.get("hyper_parameters", {})
    check_hyper_parameters({**saved, **legacy_settings(saved)}, own)
    check_shapes(
        checkpoint.get("state_dict", {}), state_dict, f"backbone {own.get('backbone')!r}, layers {own.get('layers')!r}"
    )


class NonFiniteLossError(FloatingPointError):
    """A loss term or a weight became NaN or infinite during training."""


_ADVICE = "Check the input images for NaN/inf values, or lower the learning rate."


def check_finite_terms(terms: Mapping[str, torch.Tensor], step: int, epoch: int) -> None:
    """Stop training on a non-finite loss term, so no checkpoint ever holds a broken model."""
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            msg = (
                f"TDAD's {name.upper()} loss became {value.item()} at global step {step} (epoch {epoch}); "
                f"training stopped so no checkpoint holds a broken model. {_ADVICE}"
            )
            raise NonFiniteLossError(msg)


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], step: int, epoch: int) -> None:
    """Refuse to save non-finite network weights or map statistics (``model.*``).

    Only the network: anomalib's post-processor keeps NaN thresholds until a validation pass fits them
    (e.g. with ``limit_val_batches=0``), and anomalib saves those as they are.
    """
    broken = [
        name
        for name, value in state_dict.items()
        if name.startswith("model.") and value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if broken:
        listed = ", ".join(broken[:3]) + (" ..." if len(broken) > 3 else "")
        msg = (
            f"TDAD's weights became non-finite ({listed}) at global step {step} (epoch {epoch}); the checkpoint "
            f"was not written. {_ADVICE}"
        )
        raise NonFiniteLossError(msg)
