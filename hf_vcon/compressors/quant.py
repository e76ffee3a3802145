"""k-bit weight quantization: C = s·clamp(round(W/s), −2^(b−1), 2^(b−1) − 1), symmetric, no zero point.

One scale s per tensor, per output channel (row) or per group of ``group_size`` consecutive inputs of a row, recomputed
from the latent W at every optimizer step: s = max|W| / (2^(b−1) − 1) over its block (absmax; the codes then use
the symmetric range ±(2^(b−1) − 1)), or, with ``clip_search``, the clipped range of a grid of candidates that gives
the least squared error ‖W − C‖² in each block. Trained straight-through like binary weights (the gradient reaches
W unchanged). Only weights are quantized; activations stay in floating point.

C is computed in float32 and rounded once to W's dtype, with scales that dtype represents exactly, so that
``q·s`` evaluated by any loader in that dtype (compressed-tensors in bf16, for instance) gives C bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UnsupportedLayerError
from .base import INTEGER_STRATEGIES, CompressionStats, IntegerScheme, IntegerWeight, WeightCompressor, beta_is_zero, lerp
from .options import CompressorOptions, check_choice, check_number, option
from .packing import check_packed, pack_bits, packed_bits_bytes, unpack_bits
from .registry import register_compressor

DEFAULT_GROUP_SIZE = 128
# Clipping ratios tried by ``clip_search``: the fraction of max|W| a block's codes span (1.0 is absmax).
CLIP_RATIOS = tuple(1.0 - 0.05 * k for k in range(11))  # 1.0, 0.95, …, 0.5


@dataclass(frozen=True)
class QuantOptions(CompressorOptions):
    bits: int = option(4, "bits per weight, 2 to 8 (symmetric integer codes; 8 and 4 bits run on vLLM's kernels)")
    strategy: str = option(
        "channel", "one scale per tensor, per channel (output row), or per group of group_size inputs of a row")
    group_size: int = option(
        DEFAULT_GROUP_SIZE, "inputs per scale with strategy group; a layer whose in_features it does not divide is "
        "an error when targeted by name, and stays dense with a warning under target_modules='all-linear'")
    clip_search: bool = option(
        False, "choose each scale's clipping range (0.5 to 1 of max|W|) by least squared error instead of absmax")

    def validate(self) -> None:
        check_number("bits", self.bits, 2, 8, integer=True, meaning="bits per weight")
        check_choice("strategy", self.strategy, INTEGER_STRATEGIES)
        check_number("group_size", self.group_size, 1, integer=True, meaning="inputs per scale")
        if not isinstance(self.clip_search, bool):
            raise TypeError(f"clip_search={self.clip_search!r} must be True or False.")


def _absmax(blocks: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """max |W| over ``dims`` (kept), as max(−min W, max W): exact, and on CPU an order of magnitude faster than
    ``vector_norm(ord=inf)`` or a reduction of |W| (measured: 0.55 ms against 9.8 ms for a 768 × 3072 weight in
    groups of 128)."""
    return torch.maximum(blocks.amax(dim=dims, keepdim=True), blocks.amin(dim=dims, keepdim=True).neg_())


@register_compressor("quant")
class Quantizer(WeightCompressor):
    """Symmetric round-to-nearest k-bit integers with per-tensor, per-channel or per-group scales."""

    Options = QuantOptions
    example_options = ({}, {"bits": 3, "strategy": "group", "group_size": 16},
                       {"bits": 2, "strategy": "tensor", "clip_search": True})
    accepts_leading_dims = True

    @property
    def scheme(self) -> IntegerScheme:
        options = self.options
        return IntegerScheme(options.bits, options.strategy, options.group_size if options.strategy == "group" else None)

    def check_layer(self, name, out_features, in_features):
        if self.options.strategy == "group" and in_features % self.options.group_size:
            raise UnsupportedLayerError(
                f"quant: group_size={self.options.group_size} does not divide in_features={in_features} of layer "
                f"{name!r}; choose a group_size that divides it, give the layer strategy 'channel' "
                "(module_overrides), or leave it out (exclude_modules)."
            )

    # ------------------------------------------------------------------------------------------ the maths
    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """W with each scale's block along the reduced dimensions (:meth:`_block_dims`): W itself for the tensor and
        channel strategies (a view, even of a transposed Conv1D weight), ``(..., out, in/group_size, group_size)`` for
        group."""
        if self.options.strategy != "group":
            return weight
        *lead, out_features, in_features = weight.shape
        return weight.reshape(*lead, out_features, in_features // self.options.group_size, self.options.group_size)

    def _block_dims(self) -> tuple[int, ...]:
        return (-2, -1) if self.options.strategy == "tensor" else (-1,)

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """s, float32, broadcastable against :meth:`_blocks`; exact in W's dtype (an all-zero block gets 1: its codes
        are 0)."""
        weight = weight.detach()
        blocks = self._blocks(weight)
        absmax = _absmax(blocks, self._block_dims()).float()
        if self.options.clip_search:
            return self._searched_scale(blocks, absmax)
        return self._representable(absmax / self.scheme.code_range[1], weight.dtype)

    @staticmethod
    def _representable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scale = scale.to(dtype).float()
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def _searched_scale(self, blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """Per block, the candidate scale r·absmax/qmax (r in :data:`CLIP_RATIOS`) with the least ‖W − C‖²."""
        best_scale, best_error = None, None
        for ratio in CLIP_RATIOS:
            scale = self._representable(absmax * (ratio / self.scheme.code_range[1]), blocks.dtype)
            error = self._codes(blocks, scale).mul_(scale).sub_(blocks).square_().sum(dim=self._block_dims(), keepdim=True)
            if best_scale is None:
                best_scale, best_error = scale, error
            else:
                better = error < best_error
                best_scale, best_error = torch.where(better, scale, best_scale), torch.minimum(error, best_error)
        return best_scale

    def _codes(self, blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """clamp(round(W/s)) as float32 ``(rows, blocks, size)`` (round half to even, as compressed-tensors)."""
        low, high = self.scheme.code_range
        return torch.div(blocks, scale).round_().clamp_(low, high)  # a float32 scale: computed in float32

    def _compressed(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        compressed = self._codes(self._blocks(weight), scale).mul_(scale)
        return compressed.reshape(weight.shape).to(weight.dtype)

    def compress(self, weight):
        return self._compressed(weight, self.scale(weight))

    def compression_state(self, weight, memo=None, *, frozen=False):
        return self.scale(weight)  # a frozen state fixes the scales; the codes follow W

    def blend(self, weight, state, beta):
        blended = self._compressed(weight, state)  # the one full-size result (a float32 one first for 16-bit W)
        return blended if beta_is_zero(beta) else lerp(blended, weight, beta, out=blended)  # C + β·(W − C), one pass

    # --------------------------------------------------------------------------------- integer form / sizes
    def integer_scheme(self):
        return self.scheme

    def integer_form(self, weight, params):
        weight = weight.detach()
        scale = self.scale(weight)
        codes = self._codes(self._blocks(weight), scale).reshape(weight.shape).to(torch.int8)
        return IntegerWeight(self.scheme, codes, scale.reshape(self.scheme.scale_shape(*weight.shape)), weight.dtype)

    def stats(self, weight, params):
        numel, size = weight.numel(), weight.element_size()
        scales = math.prod(self.scheme.scale_shape(*weight.shape))
        return CompressionStats(
            params_before=numel,
            params_after=numel,
            bytes_before=numel * size,
            bytes_after=packed_bits_bytes(numel * self.options.bits) + scales * size,
            setting=self.setting(),
            metrics={"bits": float(self.options.bits)},
        )

    def setting(self) -> str:
        options = self.options
        per = {"tensor": "per tensor", "channel": "per channel", "group": f"per group of {options.group_size}"}
        return f"int{options.bits}, scale {per[options.strategy]}{', clip search' if options.clip_search else ''}"

    # ---------------------------------------------------------------------------------- compact encoding
    def pack(self, weight, params):
        form = self.integer_form(weight, params)
        bits = self.options.bits
        unsigned = (form.codes.reshape(-1, 1).to(torch.int16) - form.scheme.code_range[0]).to(torch.uint8)
        shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8, device=unsigned.device)
        return {"codes": pack_bits((unsigned >> shifts) & 1), "scale": form.scale.to(weight.dtype)}

    def unpacked_weight(self, tensors, out_features, in_features):
        bits, numel = self.options.bits, out_features * in_features
        scale_shape = self.scheme.scale_shape(out_features, in_features)
        check_packed(self.name, tensors, {"codes": (packed_bits_bytes(numel * bits),), "scale": scale_shape})
        planes = unpack_bits(tensors["codes"], numel * bits).view(numel, bits).to(torch.int16)
        weights = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.int16, device=planes.device)
        codes = ((planes * weights).sum(dim=1) + self.scheme.code_range[0]).to(torch.int8).view(out_features, in_features)
        scale = tensors["scale"]
        return IntegerWeight(self.scheme, codes, scale.float(), scale.dtype).dequantize()
