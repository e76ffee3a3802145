"""Binary weights: C = sign(W) · mean|W|, one scale per tensor or per output row (sign(0) = 0).

Only weights are binarised; activations stay in floating point. The gradient reaches the latent W
unchanged (straight-through, no clipping), as in the authors' code.
"""

from __future__ import annotations

import torch

from .base import CompressionStats, Compressor, packed_bits_bytes, register_compressor


@register_compressor("binary")
class Binarizer(Compressor):
    """sign(W)·α with α = mean|W| over the tensor (``"tensor"``) or over each output row (``"channel"``)."""

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """α: a 0-d tensor, or ``(out, 1)`` for per-channel scales."""
        if self.config.binary_scale == "channel":
            return weight.abs().mean(dim=1, keepdim=True)
        return weight.abs().mean()

    def compressed_weight(self, weight, params):
        return torch.sign(weight) * self.scale(weight)

    def stats(self, weight, params):
        numel, size = weight.numel(), weight.element_size()
        scales = weight.shape[0] if self.config.binary_scale == "channel" else 1
        return CompressionStats(
            params_before=numel,
            params_after=numel,
            bytes_before=numel * size,
            bytes_after=packed_bits_bytes(numel) + scales * size,
            setting=f"1 bit + {scales} scale{'s' if scales > 1 else ''} ({self.config.binary_scale})",
            metrics={"bits": 1.0},
        )
