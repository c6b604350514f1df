"""Small tensor helpers shared by the teacher, the student and the anomaly map."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812


def resize(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a ``(B, C, H, W)`` tensor to ``size``, skipped when the size already matches."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)


def exporting() -> bool:
    """Whether the forward pass is being traced, compiled or exported (its graph must not depend on the data)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
