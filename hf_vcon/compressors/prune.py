"""Magnitude pruning: C = W ⊙ M, M keeping the largest |W| per layer, per row, or N of every M inputs.

The mask is recomputed from the latent W once per optimizer step (pruned weights can come back), with ties
broken by position (the earlier index wins), so every rank and every rerun gets the same mask. It is found by a
selection (``kthvalue``, linear time) rather than a sort; a tie straddling the cut is resolved by position.

The training state is the boolean mask (one byte per weight), found once per optimizer step. On an accelerator it
is found with device operations alone: the keep-th largest |W| of each group, the weights above it, and the tied
weights whose running count along the group is within its budget. Nothing is read back to the host and no shape
depends on the data, so a training step never waits for it. On a CPU, where reading a value back costs nothing, a
per-layer cut is searched among the weights near the previous step's cut (:func:`.selection.cut_near`): the same
mask, several times faster.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UnsupportedLayerError
from .base import CompressionStats, WeightCompressor, beta_is_zero, lerp
from .options import CompressorOptions, check_number, option
from .packing import check_packed, pack_bits, packed_bits_bytes, unpack_bits
from .registry import register_compressor
from .selection import cut_near, host_reads_are_free, keep_largest, kept_count

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


@register_compressor("prune")
class MagnitudePruner(WeightCompressor):
    """Unstructured (``"layer"``), per-row (``"row"``) or semi-structured (``"N:M"``) magnitude pruning: C = W ⊙ M."""

    Options = PruneOptions
    accepts_leading_dims = True
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
        """``tensor`` ``(..., out, in)`` viewed as the groups the pattern selects in (along the last dimension), and
        how many each keeps."""
        pattern, sparsity = self.options.prune_pattern, self.options.sparsity
        lead, (out_features, in_features) = tensor.shape[:-2], tensor.shape[-2:]
        if pattern == "layer":
            return tensor.reshape(*lead, 1, out_features * in_features), kept_count(out_features * in_features, sparsity)
        if pattern == "row":
            return tensor, kept_count(in_features, sparsity)
        n, m = parse_n_m(pattern)
        return tensor.reshape(*lead, out_features, in_features // m, m), n  # M consecutive inputs per group

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The boolean keep-mask M of W ``(..., out, in)`` (each leading index on its own)."""
        groups, keep = self._groups(weight.detach().abs())
        return keep_largest(groups, keep).view(weight.shape)

    def compress(self, weight):
        return weight * self.mask(weight)

    def compression_state(self, weight, memo=None, *, frozen=False):
        """The boolean keep-mask, whether or not it is ``frozen``: the same mask as :meth:`mask`, bit for bit. On an
        accelerator it is found with device operations alone (a selection, comparisons, a running count of the
        ties); on a CPU a layer's cut is searched near the previous step's (``memo``), several times faster."""
        if memo is not None and self.options.prune_pattern == "layer" and weight.dim() == 2 \
                and host_reads_are_free(weight.device):
            return self._mask_near_previous_cut(weight.detach(), memo)
        return self.mask(weight)

    def _mask_near_previous_cut(self, weight: torch.Tensor, memo: dict) -> torch.Tensor:
        keep = kept_count(weight.numel(), self.options.sparsity)
        if not 0 < keep < weight.numel():
            return self.mask(weight)
        value, reaching = cut_near(weight, keep, memo)
        scores = weight.abs()
        if reaching == keep:  # no tie straddles the cut: the weights reaching it are the kept ones
            return scores >= value
        return keep_largest(scores.reshape(1, -1), keep, value.view(1, 1)).view(weight.shape)

    def kept_mask(self, weight, state):
        return state

    def blend(self, weight, state, beta):
        pruned = weight * state
        if beta_is_zero(beta):
            return pruned
        return lerp(pruned, weight, beta, out=pruned)  # C + β·(W − C) in one pass: kept: W exactly; pruned: β·W

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
