"""Which entries a pruning keeps: the ``keep`` largest along the last dimension, ties broken by position (the earlier
index wins). Shared by unstructured pruning (weights) and structured pruning (neurons and heads)."""

from __future__ import annotations

from typing import Optional

import torch


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
