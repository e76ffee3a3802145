"""Which entries a pruning keeps: the ``keep`` largest along the last dimension, ties broken by position (the earlier
index wins). Shared by unstructured pruning (weights) and structured pruning (neurons and heads).

:func:`keep_largest` uses device operations alone (nothing read back to the host, no shape that depends on the
data): what an accelerator's queue needs. On a CPU the host runs every operation itself, in order, so reading a value
back costs nothing more; there :func:`cut_near` finds a layer's cut from the weights near the previous step's cut
alone, several times faster than a full selection, with the same result.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def keep_largest(scores: torch.Tensor, keep: int, threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` largest entries along the last dim (ties: the earlier index wins).

    ``threshold``, when known, is the keep-th largest entry of each row (shape ``(..., 1)``). Device operations only:
    the entries above the threshold, plus the tied entries whose running count along the row is within the row's
    tie budget (``keep`` minus the entries above), so no value is read back to the host and no shape depends on the
    data.
    """
    size = scores.shape[-1]
    if keep >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if threshold is None:
        threshold = scores.kthvalue(size - keep + 1, dim=-1, keepdim=True).values  # the keep-th largest
    mask = scores > threshold
    budget = keep - mask.sum(dim=-1, keepdim=True, dtype=torch.int32)  # how many tied entries are kept (>= 1)
    ties = scores == threshold
    within_budget = ties.cumsum(dim=-1, dtype=torch.int32) <= budget
    return mask.logical_or_(ties.logical_and_(within_budget))


def kept_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights survive ``sparsity``: ``total − round(total·sparsity)``."""
    return total - round(total * sparsity)


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of ``device`` back into Python costs nothing more than computing it: on a CPU (no
    queue of kernels runs ahead of the host), not on an accelerator."""
    return device.type == "cpu"


_BLOCK = 64  # entries per block when gathering the band: few blocks hold an entry of it


def cut_near(weight: torch.Tensor, keep: int, memo: dict) -> tuple[torch.Tensor, int]:
    """The keep-th largest |W| (a 0-d tensor) and how many |W| reach it, the same numbers as a full selection.

    ``memo`` carries the previous cut and how far it moved: the cut moves little between optimizer steps, so the
    selection runs on the |W| within a band around the previous cut, and over all of W only when the cut has left
    the band (or on the first call). Reads values back to the host: for a CPU (:func:`host_reads_are_free`).
    """
    found = _cut_in_band(weight, keep, memo["cut"], memo["width"]) if "cut" in memo else None
    if found is None:
        scores = weight.detach().abs().reshape(-1)
        value = scores.kthvalue(scores.numel() - keep + 1).values
        found = value, int(torch.count_nonzero(scores >= value))
    cut = float(found[0])
    moved = abs(cut - memo["cut"]) if "cut" in memo else 0.0
    memo["cut"], memo["width"] = cut, max(3.0 * moved, 1e-3 * cut)
    return found


def _cut_in_band(weight: torch.Tensor, keep: int, guess: float, width: float) -> Optional[tuple[torch.Tensor, int]]:
    """:func:`cut_near`'s numbers found among the |W| within ``guess ± width`` alone, or ``None`` when the cut lies
    outside that band.

    Two thresholdings (``hardshrink``, one fused pass each) split W into above the band, the band and below it; the
    band's few entries are gathered from the blocks that hold one (a per-block reduction, not a full-size boolean
    gather), so the value returned is one of the |W|, exactly. Only the multiset of |W| matters, so W is read in its
    storage order (no copy of a transposed weight).
    """
    flat = _storage_order(weight.detach())
    band = F.hardshrink(flat, max(guess - width, 0.0))  # W where |W| > guess − width, else 0
    above = F.hardshrink(band, guess + width)  # W where |W| > guess + width, else 0
    band.sub_(above).abs_()  # |W| where guess − width < |W| ≤ guess + width, else 0
    count_above = _count_nonzero(above)
    del above
    values = _positive_values(band)
    rank = keep - count_above  # the keep-th largest overall is the rank-th largest of the band
    if not 1 <= rank <= values.numel():
        return None
    value = values.kthvalue(values.numel() - rank + 1).values
    return value, count_above + int(torch.count_nonzero(values >= value))


def _storage_order(weight: torch.Tensor) -> torch.Tensor:
    """W flattened without a copy where its storage allows (contiguous, or a transposed contiguous tensor)."""
    if not weight.is_contiguous() and weight.dim() == 2 and weight.t().is_contiguous():
        return weight.t().view(-1)
    return weight.reshape(-1)


def _count_nonzero(flat: torch.Tensor) -> int:
    """The non-zeros of a flat float tensor, exactly, overwriting it: on a CPU sign, abs and a sum are several times
    faster than ``count_nonzero`` or a comparison. A float32 sum of ones is exact below 2^24; beyond that, blocks
    are summed first."""
    ones = flat.sign_().abs_()
    if ones.numel() < 2**24:
        return int(ones.sum(dtype=torch.float32))
    whole = ones.numel() - ones.numel() % _BLOCK
    blocks = ones[:whole].view(-1, _BLOCK).sum(dim=1, dtype=torch.float32)
    return int(blocks.sum(dtype=torch.float64) + ones[whole:].sum(dtype=torch.float64))


def _positive_values(flat: torch.Tensor) -> torch.Tensor:
    """The positive entries of a flat non-negative tensor that holds few: only the blocks holding one are gathered."""
    whole = flat.numel() - flat.numel() % _BLOCK
    blocks = flat[:whole].view(-1, _BLOCK)
    candidates = blocks.index_select(0, blocks.amax(dim=1).nonzero().squeeze(1)).view(-1)
    if whole < flat.numel():
        candidates = torch.cat([candidates, flat[whole:]])
    return candidates[candidates > 0]
