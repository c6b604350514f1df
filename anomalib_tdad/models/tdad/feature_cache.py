"""Teacher features of the normal training images, kept between epochs and keyed by the images' content.

The teacher is frozen (weights and BatchNorm statistics), so an input it has seen gives the same features
again. On a CPU the teacher pass is most of a training step: caching the features of the clean half of each
batch saves about a third of the step and the teacher pass of every statistics refit. An image is keyed by a
digest of its bytes, so an augmented or otherwise changed image simply misses; nothing depends on file names.
"""

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

Features = list[torch.Tensor]


def stack(entries: list[Features]) -> Features:
    """Per-image features stacked into one batch per level, in the teacher's ``channels_last`` layout (the same
    numbers in another layout would take other convolution kernels in the student, which round differently)."""
    return [
        torch.stack([features[level] for features in entries]).contiguous(memory_format=torch.channels_last)
        for level in range(len(entries[0]))
    ]


def digest(image: torch.Tensor) -> bytes:
    """A 128-bit digest of one image's shape, dtype and bytes."""
    key = hashlib.blake2b(repr((tuple(image.shape), str(image.dtype))).encode(), digest_size=16)
    key.update(image.detach().contiguous().view(torch.uint8).numpy())
    return key.digest()


class FeatureCache:
    """The teacher's features of images it has seen, up to ``max_bytes``, for CPU tensors only.

    On a GPU the teacher pass is cheap and memory dear, so GPU tensors pass straight through, and so does
    everything under autocast (its features have another dtype than a full-precision pass would give).
    Entries are never evicted: once full, further images are computed each time. Each process of a
    distributed run has its own cache. The entries are not pickled (an exported or deep-copied model starts
    empty).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: dict[bytes, Features] = {}
        self.nbytes = 0
        self.full = False  # an image was left out for want of memory
        self.version = 0  # changes with every entry added and every clear

    def clear(self) -> None:
        """Forget every entry (the teacher's weights changed, or fitting is over)."""
        self.entries.clear()
        self.nbytes = 0
        self.full = False
        self.version += 1

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "entries": {}, "nbytes": 0, "full": False, "version": 0}

    def __len__(self) -> int:
        return len(self.entries)

    def batches(self, size: int) -> Iterator[Features]:
        """Every entry, in the order stored, as batches of ``size`` (each level stacked)."""
        entries = list(self.entries.values())
        for start in range(0, len(entries), size):
            yield stack(entries[start : start + size])

    def active(self, images: torch.Tensor) -> bool:
        """Whether ``images`` are cached: CPU tensors outside autocast, with memory allowed for the cache."""
        return self.max_bytes > 0 and images.device.type == "cpu" and not torch.is_autocast_enabled("cpu")

    def __call__(self, teacher: nn.Module, images: torch.Tensor, store: bool = True) -> Features:
        """``teacher(images)``, reading the images seen before from the cache (and adding new ones if ``store``)."""
        if not self.active(images):
            return teacher(images)
        keys = [digest(image) for image in images]
        missing = [index for index, key in enumerate(keys) if key not in self.entries]
        if len(missing) == len(keys):
            computed = teacher(images)
            if store:
                self._add(keys, computed)
            return computed
        per_image: list[Features] = [self.entries.get(key, []) for key in keys]
        if missing:
            computed = teacher(images[missing])
            if store:
                self._add([keys[index] for index in missing], computed)
            for row, index in enumerate(missing):
                per_image[index] = [level[row] for level in computed]
        return stack(per_image)

    def _add(self, keys: list[bytes], features: Features) -> None:
        for row, key in enumerate(keys):
            if key in self.entries:  # the same image twice in one batch
                continue
            entry = [level[row].clone() for level in features]
            size = sum(level.numel() * level.element_size() for level in entry)
            if self.nbytes + size > self.max_bytes:
                self.full = True
                return
            self.entries[key] = entry
            self.nbytes += size
            self.version += 1
