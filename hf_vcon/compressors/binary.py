"""Binary weights: C = sign(W) · mean|W|, one scale per tensor or per output row (sign(0) = 0).

Only weights are binarised; activations stay in floating point. The gradient reaches the latent W
unchanged (straight-through, no clipping), as in the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompressionStats, IntegerScheme, IntegerWeight, WeightCompressor, beta_is_zero
from .options import CompressorOptions, check_choice, option
from .packing import check_packed, pack_bits, packed_bits_bytes, unpack_bits
from .registry import register_compressor

BINARY_SCALES = ("channel", "tensor")


@dataclass(frozen=True)
class BinaryOptions(CompressorOptions):
    binary_scale: str = option("tensor", "tensor (one mean|W| per weight, the paper's) or channel (one per output row)")

    def validate(self) -> None:
        check_choice("binary_scale", self.binary_scale, BINARY_SCALES)


@register_compressor("binary")
class Binarizer(WeightCompressor):
    """sign(W)·α with α = mean|W| over the tensor (``"tensor"``) or over each output row (``"channel"``)."""

    Options = BinaryOptions
    example_options = ({}, {"binary_scale": "channel"})
    accepts_leading_dims = True

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """α: ``(..., 1, 1)`` per tensor (a 0-d tensor for a 2-D W), or ``(..., out, 1)`` for per-channel scales. |W|
        summed: on CPU twice as fast as ``vector_norm(ord=1)``, for one transient |W| the size of this weight."""
        weight = weight.detach()
        if self.options.binary_scale == "channel":
            return weight.abs().sum(dim=-1, keepdim=True) / weight.shape[-1]
        if weight.dim() == 2:
            return weight.abs().sum() / weight.numel()
        return weight.abs().sum(dim=(-2, -1), keepdim=True) / (weight.shape[-2] * weight.shape[-1])

    def compress(self, weight):
        return torch.sign(weight) * self.scale(weight)

    def compression_state(self, weight, memo=None, *, frozen=False):
        return self.scale(weight)

    def blend(self, weight, state, beta):
        # β·W + (1−β)·α·sign(W) with a single full-size allocation
        if beta_is_zero(beta):
            return torch.sign(weight).mul_(state)
        blended = torch.sign(weight).mul_(state * (1.0 - beta))
        return blended.addcmul_(weight, beta) if isinstance(beta, torch.Tensor) else blended.add_(weight, alpha=beta)

    def integer_scheme(self):
        # ±α as 2-bit symmetric integers (codes −1, 0, +1 of the range [−2, 1]): 1-bit symmetric codes are {−1, 0}
        return IntegerScheme(2, self.options.binary_scale)

    def integer_form(self, weight, params):
        weight = weight.detach()
        scale = self.scale(weight).reshape(self._scale_shape(weight.shape[0]))
        return IntegerWeight(self.integer_scheme(), torch.sign(weight).to(torch.int8), scale.float(), weight.dtype)

    def _scale_count(self, out_features: int) -> int:
        return out_features if self.options.binary_scale == "channel" else 1

    def stats(self, weight, params):
        numel, size = weight.numel(), weight.element_size()
        scales = self._scale_count(weight.shape[0])
        return CompressionStats(
            params_before=numel,
            params_after=numel,
            bytes_before=numel * size,
            bytes_after=packed_bits_bytes(numel) + scales * size,
            setting=self.setting(),
            metrics={"bits": 1.0},
        )

    def setting(self) -> str:
        per = " per output row" if self.options.binary_scale == "channel" else ""
        return f"1 bit + 1 scale{per} ({self.options.binary_scale})"

    def _scale_shape(self, out_features: int) -> tuple[int, ...]:
        return (out_features, 1) if self.options.binary_scale == "channel" else (1,)

    def pack(self, weight, params):
        weight = weight.detach()
        packed = {"signs": pack_bits(weight > 0), "scale": self.scale(weight).reshape(self._scale_shape(weight.shape[0]))}
        zeros = torch.nonzero(weight.reshape(-1) == 0).reshape(-1)
        if zeros.numel():  # sign(0) = 0 needs a third value: the (rare) exact zeros' flat positions, stored only then
            packed["zero_positions"] = zeros
        return packed

    def unpacked_weight(self, tensors, out_features, in_features):
        numel = out_features * in_features
        bits = (packed_bits_bytes(numel),)
        check_packed(self.name, tensors, {"signs": bits, "scale": self._scale_shape(out_features)},
                     optional=("zero_positions",))
        scale = tensors["scale"]
        signs = unpack_bits(tensors["signs"], numel).to(scale.dtype).mul_(2).sub_(1)
        zeros = tensors.get("zero_positions")
        if zeros is not None:
            if zeros.dim() != 1 or zeros.is_floating_point() or (zeros.numel() and not 0 <= int(zeros.min()) <= int(zeros.max()) < numel):
                raise ValueError(f"binary: 'zero_positions' must be flat indices below {numel}.")
            signs[zeros] = 0
        signs = signs.view(out_features, in_features)
        return signs.mul_(scale if self.options.binary_scale == "channel" else scale.reshape(()))
