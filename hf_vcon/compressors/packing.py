"""Bit packing and checks shared by the compact encodings of the compressions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def packed_bits_bytes(count: int) -> int:
    """Bytes needed to store ``count`` bits, 8 per byte."""
    return math.ceil(count / 8)


_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # most significant bit first, as numpy.packbits


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as ``uint8`` bytes, 8 bits per byte (row-major, most significant bit first, zero-padded)."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) << _BIT_SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of :func:`pack_bits`'s bytes, as a flat boolean tensor."""
    bits = (packed.reshape(-1, 1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()


def check_packed(
    method: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], optional: tuple[str, ...] = ()
) -> None:
    """Raise ``ValueError`` unless ``tensors`` has exactly the ``expected`` keys (plus any of ``optional``) with
    those shapes (``-1`` in a shape matches any size)."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - set(optional))
    if missing or extra:
        raise ValueError(f"{method}: expected packed tensors {sorted(expected)}, missing {missing}, unexpected {extra}.")
    for key, shape in expected.items():
        actual = tuple(tensors[key].shape)
        if len(actual) != len(shape) or any(want not in (-1, got) for want, got in zip(shape, actual)):
            raise ValueError(f"{method}: packed tensor {key!r} has shape {list(actual)}, expected {list(shape)}.")
