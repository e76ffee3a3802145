"""Magnitude pruning: C = W ⊙ M, M keeping the largest |W| per layer, per row, or N of every M inputs.

The mask is recomputed from the latent W once per optimizer step (pruned weights can come back), with ties
broken by position (the earlier index wins), so every rank and every rerun gets the same mask. It is found by a
selection (``kthvalue``, linear time) rather than a sort; a tie straddling the cut is resolved by position.
"""

from __future__ import annotations

import torch

from ..config import parse_n_m
from .base import CompressionStats, Compressor, check_packed, pack_bits, packed_bits_bytes, register_compressor, unpack_bits


def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` largest entries along the last dim (ties: the earlier index wins)."""
    size = scores.shape[-1]
    if keep >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(size - keep + 1, dim=-1, keepdim=True).values  # the keep-th largest
    mask = scores > threshold
    ties = scores == threshold
    missing = keep - mask.sum(dim=-1, keepdim=True)  # how many entries equal to the threshold are kept (>= 1)
    tie_counts = ties.sum(dim=-1, keepdim=True)
    if torch.equal(tie_counts, missing):  # the usual case: no tie straddles the cut
        return mask.logical_or_(ties)
    return mask.logical_or_(ties & (ties.cumsum(dim=-1) <= missing))


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

    def _groups(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``tensor`` ``(out, in)`` viewed as the groups the pattern selects in, and how many each keeps."""
        pattern = self.config.prune_pattern
        if pattern == "layer":
            return tensor.reshape(1, -1), kept_count(tensor.numel(), self.config.sparsity)
        if pattern == "row":
            return tensor, kept_count(tensor.shape[1], self.config.sparsity)
        n, m = parse_n_m(pattern)
        return tensor.reshape(tensor.shape[0], -1, m), n  # (out, in/M, M): M consecutive inputs per group

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The boolean keep-mask of W ``(out, in)``."""
        groups, keep = self._groups(weight.detach().abs())
        return _keep_largest(groups, keep).view(weight.shape)

    def compression_state(self, weight):
        return self.mask(weight)

    def blend(self, weight, state, beta):
        if beta == 0.0:
            return weight * state
        return torch.where(state, weight, weight * beta)  # kept: W; pruned: β·W

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

    def pack(self, weight, params):
        mask = self.mask(weight)
        return {"values": weight.detach()[mask].clone(), "mask": pack_bits(mask)}

    def unpacked_weight(self, tensors, out_features, in_features):
        numel = out_features * in_features
        check_packed(self.name, tensors, {"values": (-1,), "mask": (packed_bits_bytes(numel),)})
        mask = unpack_bits(tensors["mask"], numel).view(out_features, in_features)
        groups, keep = self._groups(mask)
        if not bool((groups.sum(dim=-1) == keep).all()):
            raise ValueError(
                f"prune: the stored mask does not keep {keep} weights per {self.config.prune_pattern!r} group, as "
                f"sparsity={self.config.sparsity} requires."
            )
        if tensors["values"].numel() != keep * groups[..., 0].numel():
            raise ValueError(f"prune: {tensors['values'].numel()} stored values for a mask keeping {int(mask.sum())}.")
        weight = torch.zeros(out_features, in_features, dtype=tensors["values"].dtype)
        weight[mask] = tensors["values"]
        return weight
