"""Low-rank factorisation: C = B·A from the truncated SVD of W, A = Vh[:r] ``(r, in)``, B = U[:, :r]·diag(S[:r])
``(out, r)``.

A and B are trainable parameters of their own, next to the dense W of the original path, so autograd
differentiates through C; the compressed path alone is computed as two thin matmuls ``B(Ax)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CompressionStats, Compressor, register_compressor


@register_compressor("lowrank")
class LowRankFactorizer(Compressor):
    """Rank-r factors of W; r is ``config.rank`` or ``round(config.rank_ratio · min(out, in))`` (at least 1)."""

    straight_through = False

    def rank_for(self, out_features: int, in_features: int) -> int:
        if self.config.rank is not None:
            return self.config.rank
        return max(1, round(self.config.rank_ratio * min(out_features, in_features)))

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        rank = self.rank_for(out_features, in_features)
        if rank >= min(out_features, in_features):
            given = f"rank={self.config.rank}" if self.config.rank is not None else f"rank_ratio={self.config.rank_ratio}"
            raise ValueError(
                f"{given} gives rank {rank} for layer {name!r} of shape ({out_features}, {in_features}); the rank must "
                f"be < min(out, in) = {min(out_features, in_features)} to compress. Lower it or exclude the layer."
            )

    def init_params(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        rank = self.rank_for(*weight.shape)
        # The SVD runs in float32 whatever the weight dtype: bf16/fp16 SVDs are unsupported or inaccurate.
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        factor_a = vh[:rank]  # (r, in)
        factor_b = u[:, :rank] * s[:rank]  # (out, r): singular values folded into B
        return {"A": factor_a.to(weight.dtype).contiguous(), "B": factor_b.to(weight.dtype).contiguous()}

    def compressed_weight(self, weight, params):
        return params["B"] @ params["A"]

    def compressed_forward(self, x, weight, params, bias):
        return F.linear(F.linear(x, params["A"]), params["B"], bias)

    def stats(self, weight, params):
        out_features, in_features = weight.shape
        rank = params["A"].shape[0]
        size = weight.element_size()
        return CompressionStats(
            params_before=weight.numel(),
            params_after=rank * (out_features + in_features),
            bytes_before=weight.numel() * size,
            bytes_after=rank * (out_features + in_features) * params["A"].element_size(),
            setting=f"rank {rank}",
            metrics={"rank": float(rank)},
        )
