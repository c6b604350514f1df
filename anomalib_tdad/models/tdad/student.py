"""The student: a one-class bottleneck and a decoder generated from the teacher's ``feature_info``.

As in reverse distillation (RD4AD), the student never sees the image. The bottleneck fuses the
teacher's levels into one compact embedding at stride 32 (RD4AD's, for a teacher whose coarsest level
is at stride 16), or at the coarsest level's stride if that is coarser; the decoder expands it
back to every level with exactly the teacher's channels and spatial sizes. Nothing here depends
on a backbone family, so any timm CNN with ``features_only`` gets a student.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from .utils import resize


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


EMBEDDING_STRIDE = 32


def embedding_stride(reductions: Sequence[int]) -> int:
    """Stride of the student's embedding: 32, or the coarsest teacher stride if that is coarser."""
    return max(EMBEDDING_STRIDE, max(reductions))


def default_embedding_dim(channels: Sequence[int], reductions: Sequence[int]) -> int:
    """Channels of the embedding when none are given: twice those of the coarsest level finer than the embedding
    (RD4AD's 2048 for a WideResNet-50's 1024 at stride 16; of the coarsest level if none is finer), at least 256.
    A level at the embedding's stride (e.g. stride 32) feeds the embedding without widening it."""
    stride = embedding_stride(reductions)
    finer = [width for width, reduction in zip(channels, reductions, strict=True) if reduction < stride]
    return max(256, 2 * (finer[-1] if finer else channels[-1]))


class Bottleneck(nn.Module):
    """Fuse the teacher's levels into one embedding at :func:`embedding_stride`.

    Args:
        channels: Teacher channels per level, finest first.
        reductions: Teacher strides per level, finest first.
        embedding_dim: Channels of the embedding.
    """

    def __init__(self, channels: Sequence[int], reductions: Sequence[int], embedding_dim: int) -> None:
        super().__init__()
        coarsest, width = max(reductions), channels[-1]
        down = max(0, round(math.log2(embedding_stride(reductions) / coarsest)))
        self.branches = nn.ModuleList()
        for in_channels, reduction in zip(channels, reductions, strict=True):
            steps = max(0, round(math.log2(coarsest / reduction)))
            layers = [conv_bn_relu(in_channels if i == 0 else width, width, stride=2) for i in range(steps)]
            self.branches.append(nn.Sequential(*layers) if layers else conv_bn_relu(in_channels, width))
        fuse = [conv_bn_relu(width * len(channels), embedding_dim, stride=2 if down else 1)]
        fuse += [conv_bn_relu(embedding_dim, embedding_dim, stride=2) for _ in range(down - 1)]
        self.fuse = nn.Sequential(*fuse, conv_bn_relu(embedding_dim, embedding_dim))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed the teacher features (finest first)."""
        size = features[-1].shape[-2:]
        branches = [resize(branch(f), size) for branch, f in zip(self.branches, features, strict=True)]
        return self.fuse(torch.cat(branches, dim=1))


class Decoder(nn.Module):
    """Expand the embedding back to each teacher level, coarsest first, without skip connections.

    Args:
        embedding_dim: Channels of the embedding.
        channels: Teacher channels per level, finest first; each head outputs exactly these.
        min_width: Smallest number of channels inside a decoder stage.
    """

    def __init__(self, embedding_dim: int, channels: Sequence[int], min_width: int = 64) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        in_channels = embedding_dim
        for out_channels in reversed(channels):
            width = max(out_channels, min_width)
            self.stages.append(nn.Sequential(conv_bn_relu(in_channels, width), conv_bn_relu(width, width)))
            self.heads.append(nn.Conv2d(width, out_channels, kernel_size=1))
            in_channels = width

    def forward(self, embedding: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Decode to the teacher's spatial ``sizes`` (finest first); returns features finest first."""
        outputs = []
        hidden = embedding
        for stage, head, size in zip(self.stages, self.heads, reversed(sizes), strict=True):
            hidden = stage(resize(hidden, size))
            outputs.append(head(hidden))
        return outputs[::-1]


class Student(nn.Module):
    """Bottleneck and decoder for a teacher with the given per-level channels and strides (``embedding_dim=None``:
    :func:`default_embedding_dim`)."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int], embedding_dim: int | None = None) -> None:
        super().__init__()
        if len(channels) != len(reductions) or not channels:
            msg = f"Need one stride per level, got channels={list(channels)} and reductions={list(reductions)}."
            raise ValueError(msg)
        self.embedding_dim = embedding_dim or default_embedding_dim(channels, reductions)
        embedding_dim = self.embedding_dim
        self.bottleneck = Bottleneck(channels, reductions, embedding_dim)
        self.decoder = Decoder(embedding_dim, channels)
        self.to(memory_format=torch.channels_last)  # the teacher's layout (see Teacher)

    def forward(self, teacher_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reconstruct the teacher features (finest first) from their compact embedding."""
        sizes = [f.shape[-2:] for f in teacher_features]
        return self.decoder(self.bottleneck(teacher_features), sizes)
