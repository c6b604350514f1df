"""Small tensor helpers shared by the teacher, the student and the anomaly map."""

from collections.abc import Sequence
from functools import cache

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


@cache
def native_bf16_cpu() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bf16 convolutions run
    about twice as fast as float32 ones (elsewhere bf16 is emulated and no faster).

    torch offers these checks only as private functions; should one go, this answers False (float32 training:
    slower, nothing wrong).
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)
