"""Magnitude pruning: C = W ⊙ M, M keeping the largest |W| per layer, per row, or N of every M inputs.

The mask is recomputed from the latent W once per optimizer step (pruned weights can come back), with ties
broken by position (the earlier index wins), so every rank and every rerun gets the same mask. It is found by a
selection (``kthvalue``, linear time) rather than a sort; a tie straddling the cut is resolved by position.

During training (per-layer pattern) the cut moves little from one optimizer step to the next, so the selection
runs only on the weights near the previous cut (:func:`_keep_threshold_near`), with a full selection when the
cut has left that band: the same mask, found ~4× faster. The training state is not a mask but a :class:`Cut`:
the number λ with C = hardshrink(W, λ) (exactly the weights with |W| > λ), plus the few positions tied at the cut
that the position rule prunes (ties at the cut are common in large fp32 layers). No full-size mask is stored and
C is built in one fused pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..config import parse_n_m
from .base import CompressionStats, Compressor, check_packed, pack_bits, packed_bits_bytes, register_compressor, unpack_bits


def _keep_largest(scores: torch.Tensor, keep: int, threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` largest entries along the last dim (ties: the earlier index wins).

    ``threshold``, when known, is the keep-th largest entry of each row (shape ``(..., 1)``).
    """
    size = scores.shape[-1]
    if keep >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if threshold is None:
        threshold = scores.kthvalue(size - keep + 1, dim=-1, keepdim=True).values  # the keep-th largest
    mask = scores > threshold
    ties = scores == threshold
    missing = keep - mask.sum(dim=-1, keepdim=True)  # how many entries equal to the threshold are kept (>= 1)
    tie_counts = ties.sum(dim=-1, keepdim=True)
    if torch.equal(tie_counts, missing):  # the usual case: no tie straddles the cut
        return mask.logical_or_(ties)
    return mask.logical_or_(ties & (ties.cumsum(dim=-1) <= missing))


def _keep_threshold_near(weight: torch.Tensor, keep: int, guess: float, width: float) -> Optional[tuple]:
    """The keep-th largest |W| and how many |W| reach it, found among the |W| within ``guess ± width`` alone;
    ``None`` when it lies outside that band.

    The three parts (above, band, below) are cut on one computed offset |W| − guess, so they are ordered like
    |W| even where rounding merges offsets; the value returned is one of the |W|, exactly.
    """
    flat = weight.reshape(-1)
    offset = flat.abs().sub_(guess)  # one full-size temporary, reused in place
    above = int(torch.count_nonzero(offset > width))
    band = flat[offset.abs_() <= width].abs_()
    rank = keep - above  # the keep-th largest overall is the rank-th largest of the band
    if not 1 <= rank <= band.numel():
        return None
    value = band.kthvalue(band.numel() - rank + 1).values
    return value, above + int(torch.count_nonzero(band >= value))


class Cut(NamedTuple):
    """A per-layer pruning cut: C keeps the weights with |W| > ``lambd``, except the positions in ``dropped``
    (``(rows, cols)``: weights tied at the cut that the position rule prunes). No full-size mask is stored, and
    C is built in one fused pass (``hardshrink``)."""

    lambd: float
    dropped: Optional[tuple] = None

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        pruned = F.hardshrink(weight, self.lambd)
        if self.dropped is not None:
            pruned[self.dropped] = 0.0
        return pruned

    def kept(self, weight: torch.Tensor) -> torch.Tensor:
        kept = weight.abs() > self.lambd
        if self.dropped is not None:
            kept[self.dropped] = False
        return kept


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

    def compression_state(self, weight, memo=None):
        """A :class:`Cut` for a per-layer pattern, else the boolean mask.

        With ``recompute_every > 1`` it is always the mask: the kept set, not the cut, holds until the next refresh.
        ``memo`` (one dict per layer, kept across steps) remembers the previous cut and how far it moved.
        """
        if self.config.prune_pattern != "layer" or memo is None:
            return self.mask(weight)
        weight, keep = weight.detach(), kept_count(weight.numel(), self.config.sparsity)
        if not 0 < keep < weight.numel():
            return self.mask(weight)
        value, reaching = self._find_cut(weight, keep, memo)
        if self.config.recompute_every > 1:
            return _keep_largest(weight.abs().reshape(1, -1), keep, value.view(1, 1)).view(weight.shape)
        lambd = float(torch.nextafter(value, value.new_zeros(()).fill_(-math.inf)))  # |W| > λ  ⟺  |W| ≥ value
        if reaching == keep:
            return Cut(lambd)
        # a tie straddles the cut: the earliest tied positions are kept, the later ones pruned
        tied = torch.nonzero(weight.abs() == value)  # (n, 2), in row-major order
        return Cut(lambd, tied[keep - (reaching - tied.shape[0]):].unbind(1))

    @staticmethod
    def _find_cut(weight: torch.Tensor, keep: int, memo: dict) -> tuple:
        """The keep-th largest |W| (a 0-d tensor) and how many |W| reach it; near the previous cut when it can."""
        found = None
        if "cut" in memo:
            found = _keep_threshold_near(weight, keep, memo["cut"], memo["width"])
        if found is None:  # first step, or the cut left the band: a full selection
            scores = weight.abs().reshape(-1)
            value = scores.kthvalue(scores.numel() - keep + 1).values
            found = value, int(torch.count_nonzero(scores >= value))
        cut = float(found[0])
        moved = abs(cut - memo["cut"]) if "cut" in memo else 0.0
        memo["cut"], memo["width"] = cut, max(3.0 * moved, 1e-3 * cut)
        return found

    def weight_gradient(self, grad, weight, state):
        """Straight-through (pruned weights keep learning and can come back), except for gradual magnitude pruning,
        whose pruned weights get no gradient, as in Zhu & Gupta (2017)."""
        if self.config.transition != "gmp":
            return grad
        return grad * (state.kept(weight) if isinstance(state, Cut) else state)

    def blend(self, weight, state, beta):
        pruned = state.apply(weight) if isinstance(state, Cut) else weight * state
        if beta == 0.0:
            return pruned
        return pruned.mul_(1.0 - beta).add_(weight, alpha=beta)  # kept: W; pruned: β·W

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
