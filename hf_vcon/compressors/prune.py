"""Magnitude pruning: C = W ⊙ M, M keeping the largest |W| per layer, per row, or N of every M inputs.

The mask is recomputed from the latent W at every forward pass (pruned weights can come back), with ties
broken by position (a stable sort keeps the earlier index), so every rank and every rerun gets the same mask.
"""

from __future__ import annotations

import torch

from ..config import parse_n_m
from .base import CompressionStats, Compressor, packed_bits_bytes, register_compressor


def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` largest entries along the last dim (ties: the earlier index wins)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :keep], True)


def kept_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights survive ``sparsity``: ``total − round(total·sparsity)``."""
    return total - round(total * sparsity)


@register_compressor("prune")
class MagnitudePruner(Compressor):
    """Unstructured (``"layer"``), per-row (``"row"``) or semi-structured (``"N:M"``) magnitude pruning."""

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        if self.config.prune_pattern in ("layer", "row"):
            return
        _, m = parse_n_m(self.config.prune_pattern)
        if in_features % m:
            raise ValueError(
                f"prune_pattern={self.config.prune_pattern!r} needs in_features divisible by {m}, but layer "
                f"{name!r} has in_features={in_features}; exclude it with exclude_modules or use another pattern."
            )

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The boolean keep-mask of W ``(out, in)``."""
        scores = weight.detach().abs()
        pattern = self.config.prune_pattern
        if pattern == "layer":
            return _keep_largest(scores.flatten(), kept_count(scores.numel(), self.config.sparsity)).view_as(weight)
        if pattern == "row":
            return _keep_largest(scores, kept_count(scores.shape[1], self.config.sparsity))
        n, m = parse_n_m(pattern)
        groups = scores.view(scores.shape[0], -1, m)  # (out, in/M, M): M consecutive inputs per group
        return _keep_largest(groups, n).view_as(weight)

    def compressed_weight(self, weight, params):
        return weight * self.mask(weight)

    def stats(self, weight, params):
        numel, size = weight.numel(), weight.element_size()
        kept = int(self.mask(weight).sum())
        return CompressionStats(
            params_before=numel,
            params_after=kept,
            bytes_before=numel * size,
            bytes_after=kept * size + packed_bits_bytes(numel),
            setting=f"sparsity {1 - kept / numel:.3f} ({self.config.prune_pattern})",
            metrics={"sparsity": 1 - kept / numel},
        )
