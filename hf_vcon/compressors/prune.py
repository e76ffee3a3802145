"""Magnitude pruning: C = W ⊙ M, M keeping the largest |W| per layer, per row, or N of every M inputs.

The mask is recomputed from the latent W once per optimizer step (pruned weights can come back), with ties
broken by position (the earlier index wins), so every rank and every rerun gets the same mask. It is found by a
selection (``kthvalue``, linear time) rather than a sort; a tie straddling the cut is resolved by position.

During training (per-layer pattern) the cut moves little from one optimizer step to the next, so the selection
runs only on the weights near the previous cut (:func:`_keep_threshold_near`), with a full selection when the
cut has left that band: the same mask, found ~5× faster. The training state is not a mask but a :class:`Cut`:
the number λ with C = hardshrink(W, λ) (exactly the weights with |W| > λ), plus the few positions tied at the cut
that the position rule prunes (ties at the cut are common in large fp32 layers). No full-size mask is stored and
C is built in one fused pass.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError
from .base import CompressionStats, WeightCompressor
from .options import CompressorOptions, check_number, option
from .packing import check_packed, pack_bits, packed_bits_bytes, unpack_bits
from .registry import register_compressor

DEFAULT_SPARSITY = 0.9
_N_M_PATTERN = re.compile(r"^\s*(\S+)\s*:\s*(\S+)\s*$")


def parse_n_m(pattern: str) -> tuple[int, int]:
    """Parse an ``"N:M"`` prune pattern such as ``"2:4"`` into ``(2, 4)``.

    Raises:
        ValueError: if the string is not two integers ``0 < N < M`` separated by a colon.
    """
    match = _N_M_PATTERN.match(pattern)
    if match is None or not all(part.isdigit() for part in match.groups()):
        raise ValueError(
            f"prune_pattern={pattern!r} is not valid: use 'layer', 'row', or 'N:M' with integers 0 < N < M, "
            "such as '2:4'."
        )
    n, m = (int(part) for part in match.groups())
    if not 0 < n < m:
        raise ValueError(f"prune_pattern={pattern!r} is not valid: an N:M pattern needs 0 < N < M, such as '2:4'.")
    return n, m


@dataclass(frozen=True)
class PruneOptions(CompressorOptions):
    sparsity: Optional[float] = option(
        None, "the fraction of weights set to zero, in [0, 1); default 0.9; implied by an N:M pattern (1 − N/M)")
    prune_pattern: str = option(
        "layer", "layer (unstructured, per layer), row (the same fraction in every output row), or N:M such as 2:4 "
                 "(N non-zeros in every M consecutive inputs)")

    def validate(self) -> None:
        if not isinstance(self.prune_pattern, str):
            raise TypeError(f"prune_pattern={self.prune_pattern!r} must be 'layer', 'row' or an 'N:M' string.")
        if self.prune_pattern in ("layer", "row"):
            sparsity = DEFAULT_SPARSITY if self.sparsity is None else self.sparsity
            check_number("sparsity", sparsity, 0.0, 1.0, high_open=True, meaning="the fraction of weights set to zero")
            self._resolve("sparsity", float(sparsity))
            return
        n, m = parse_n_m(self.prune_pattern)
        self._resolve("prune_pattern", f"{n}:{m}")
        implied = 1 - n / m
        if self.sparsity is None:
            self._resolve("sparsity", implied)
        elif not isinstance(self.sparsity, (int, float)) or not math.isclose(self.sparsity, implied):
            raise ValueError(
                f"sparsity={self.sparsity!r} contradicts prune_pattern={self.prune_pattern!r}, which implies "
                f"sparsity={implied}; give sparsity={implied} or omit it with an N:M pattern."
            )


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


_BLOCK = 64  # weights per block when locating the band: few blocks hold a weight of the band


def _keep_threshold_near(weight: torch.Tensor, keep: int, guess: float, width: float) -> Optional[tuple]:
    """The keep-th largest |W| and how many |W| reach it, found among the |W| within ``guess ± width`` alone;
    ``None`` when it lies outside that band.

    Two thresholdings (``hardshrink``, one fused pass each, exact comparisons) split W into above the band, the band
    and below it; the band's few weights are gathered from the blocks that hold one (a per-block reduction, not a
    full-size boolean gather), so the value returned is one of the |W|, exactly. Only the multiset of |W| matters
    here, so W is read in its storage order (no copy of a transposed Conv1D weight).
    """
    flat = _storage_order(weight)
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
    """The non-zeros of a flat float tensor, exactly, overwriting it. On CPU ``count_nonzero`` and comparisons are
    several times slower than sign, abs and a sum. A float sum of ones is exact while the count stays below 2^24
    (fp32; 256 in bf16, so 16-bit tensors are summed in fp32), beyond that blocks of 64 are summed first."""
    if flat.device.type != "cpu":
        return int(torch.count_nonzero(flat))
    ones = flat.sign_().abs_()
    if ones.numel() < 2**24:
        return int(ones.sum(dtype=torch.float32))
    whole = ones.numel() - ones.numel() % _BLOCK
    count = ones[:whole].view(-1, _BLOCK).sum(dim=1).sum(dtype=torch.float64) + ones[whole:].sum(dtype=torch.float64)
    return int(count)


def _positive_values(flat: torch.Tensor) -> torch.Tensor:
    """The positive entries of a flat non-negative tensor with few of them: only the blocks holding one are
    gathered."""
    whole = flat.numel() - flat.numel() % _BLOCK
    blocks = flat[:whole].view(-1, _BLOCK)
    candidates = blocks.index_select(0, blocks.amax(dim=1).nonzero().squeeze(1)).view(-1)
    if whole < flat.numel():
        candidates = torch.cat([candidates, flat[whole:]])
    return candidates[candidates > 0]


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
class MagnitudePruner(WeightCompressor):
    """Unstructured (``"layer"``), per-row (``"row"``) or semi-structured (``"N:M"``) magnitude pruning: C = W ⊙ M."""

    Options = PruneOptions
    gradual_option = "sparsity"
    example_options = ({"sparsity": 0.5}, {"sparsity": 0.75, "prune_pattern": "row"}, {"prune_pattern": "2:4"})

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        pattern = self.options.prune_pattern
        if pattern in ("layer", "row"):
            return
        _, m = parse_n_m(pattern)
        if in_features % m:
            raise UnsupportedLayerError(
                f"prune_pattern={pattern!r} needs in_features divisible by {m}, but layer {name!r} has "
                f"in_features={in_features}; exclude it with exclude_modules or use another pattern."
            )

    def check_gradual(self) -> None:
        if self.options.prune_pattern not in ("layer", "row"):
            raise ValueError(
                f"transition='gmp' raises the sparsity gradually, which prune_pattern={self.options.prune_pattern!r} "
                "(a fixed N:M sparsity) cannot do; use prune_pattern='layer' or 'row', or transition='vcon'."
            )

    def _groups(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``tensor`` ``(out, in)`` viewed as the groups the pattern selects in, and how many each keeps."""
        pattern, sparsity = self.options.prune_pattern, self.options.sparsity
        if pattern == "layer":
            return tensor.reshape(1, -1), kept_count(tensor.numel(), sparsity)
        if pattern == "row":
            return tensor, kept_count(tensor.shape[1], sparsity)
        n, m = parse_n_m(pattern)
        return tensor.reshape(tensor.shape[0], -1, m), n  # (out, in/M, M): M consecutive inputs per group

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The boolean keep-mask M of W ``(out, in)``."""
        groups, keep = self._groups(weight.detach().abs())
        return _keep_largest(groups, keep).view(weight.shape)

    def compress(self, weight):
        return weight * self.mask(weight)

    def compression_state(self, weight, memo=None, *, frozen=False):
        """A :class:`Cut` for a per-layer pattern, else the boolean mask; the mask too when ``frozen`` (the kept set,
        not the cut, must hold while W moves). ``memo`` remembers the previous cut and how far it moved."""
        if self.options.prune_pattern != "layer" or memo is None:
            return self.mask(weight)
        weight, keep = weight.detach(), kept_count(weight.numel(), self.options.sparsity)
        if not 0 < keep < weight.numel():
            return self.mask(weight)
        value, reaching = self._find_cut(weight, keep, memo)
        if frozen:
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

    def kept_mask(self, weight, state):
        return state.kept(weight) if isinstance(state, Cut) else state

    def blend(self, weight, state, beta):
        pruned = state.apply(weight) if isinstance(state, Cut) else weight * state
        if beta == 0.0:
            return pruned
        return pruned.lerp_(weight, beta)  # C + β·(W − C) in one pass: kept: W exactly; pruned: β·W

    def setting(self) -> str:
        return f"sparsity {self.options.sparsity:.3f} ({self.options.prune_pattern})"

    def stats(self, weight, params):
        numel, size = weight.numel(), weight.element_size()
        kept = int(self.mask(weight).sum())
        return CompressionStats(
            params_before=numel,
            params_after=kept,
            bytes_before=numel * size,
            bytes_after=kept * size + packed_bits_bytes(numel),
            setting=f"sparsity {1 - kept / numel:.3f} ({self.options.prune_pattern})",
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
                f"prune: the stored mask does not keep {keep} weights per {self.options.prune_pattern!r} group, as "
                f"sparsity={self.options.sparsity} requires."
            )
        if tensors["values"].numel() != keep * groups[..., 0].numel():
            raise ValueError(f"prune: {tensors['values'].numel()} stored values for a mask keeping {int(mask.sum())}.")
        weight = torch.zeros(out_features, in_features, dtype=tensors["values"].dtype)
        weight[mask] = tensors["values"]
        return weight
