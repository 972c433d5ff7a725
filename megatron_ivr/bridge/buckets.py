"""Flattened buckets: many tensors packed into one contiguous byte buffer plus metadata.

The layout is SGLang's ``flattened_bucket`` load format: a ``uint8`` tensor and, per
tensor, ``name, shape, dtype, start_idx, end_idx, numel`` (byte offsets). Metadata entries
are ``types.SimpleNamespace`` objects, which SGLang's allow-listed unpickler accepts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass
class Bucket:
    flat: torch.Tensor  # uint8, contiguous
    metadata: list[SimpleNamespace]

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.metadata]


def flatten(named: list[tuple[str, torch.Tensor]]) -> Bucket:
    if not named:
        raise ValueError("cannot flatten an empty bucket")
    parts, metadata, offset = [], [], 0
    for name, tensor in named:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        metadata.append(SimpleNamespace(name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype,
                                        start_idx=offset, end_idx=offset + raw.numel(), numel=raw.numel()))
        parts.append(raw)
        offset += raw.numel()
    return Bucket(torch.cat(parts), metadata)


def unflatten(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    return [(m.name, bucket.flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in bucket.metadata]


def bucketize(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group tensors in stream order into buckets of at most ``bucket_bytes`` (a larger
    tensor travels alone)."""
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > bucket_bytes:
            yield flatten(pending)
            pending, size = [], 0
        pending.append((name, tensor))
        size += nbytes
    if pending:
        yield flatten(pending)
