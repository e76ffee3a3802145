"""Low-rank factorisation: C = B·A from the truncated SVD of W, A = Vh[:r] ``(r, in)``, B = U[:, :r]·diag(S[:r])
``(out, r)``.

A and B are trainable parameters of their own, next to the dense W of the original path, so autograd
differentiates through C; the compressed path alone is computed as two thin matmuls ``B(Ax)``, and exported as
a :class:`LowRankLinear` of two Linears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from ..utils.linears import linear_shape
from .base import CompressionStats, FactorCompressor
from .options import CompressorOptions, check_number, option
from .packing import check_packed
from .registry import register_compressor


@dataclass(frozen=True)
class LowRankOptions(CompressorOptions):
    rank: Optional[int] = option(None, "the rank r of every targeted layer (give rank or rank_ratio)")
    rank_ratio: Optional[float] = option(None, "r as a fraction in (0, 1) of min(in, out) of each layer")

    def validate(self) -> None:
        if (self.rank is None) == (self.rank_ratio is None):
            raise ValueError(
                "method='lowrank' needs exactly one of rank (an int > 0) and rank_ratio (a float in (0, 1)); "
                f"got rank={self.rank!r}, rank_ratio={self.rank_ratio!r}."
            )
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0):
            raise ValueError(f"rank={self.rank!r} must be an int > 0.")
        if self.rank_ratio is not None:
            check_number("rank_ratio", self.rank_ratio, 0.0, 1.0, low_open=True, high_open=True,
                         meaning="a fraction of min(in, out)")


def max_compressing_rank(out_features: int, in_features: int) -> int:
    """The largest r whose factors are smaller than the weight: r·(out + in) < out·in (0 if none is)."""
    return (out_features * in_features - 1) // (out_features + in_features)


class LowRankLinear(nn.Module):
    """``y = B(Ax) + b``: a rank-r Linear stored and computed as its two factors.

    ``A`` is an ``nn.Linear(in_features, rank, bias=False)`` (weight ``(r, in)``), ``B`` an
    ``nn.Linear(rank, out_features)`` (weight ``(out, r)``, carrying the bias). :func:`hf_vcon.load_compressed`
    builds these for low-rank layers.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, factor_a: torch.Tensor, factor_b: torch.Tensor, bias: Optional[torch.Tensor]) -> "LowRankLinear":
        """Build from A ``(r, in)``, B ``(out, r)`` and an optional bias ``(out,)`` (copied)."""
        module = cls(factor_a.shape[1], factor_b.shape[0], factor_a.shape[0], bias=bias is not None,
                     device=factor_a.device, dtype=factor_a.dtype)
        with torch.no_grad():
            module.A.weight.copy_(factor_a)
            module.B.weight.copy_(factor_b)
            if bias is not None:
                module.B.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def weight(self) -> torch.Tensor:
        """The product B·A ``(out, in)``, for model code that reads a Linear's ``.weight`` (T5 reads its dtype).

        For inference it is built on first read and kept until a factor changes, so a model that reads it every
        forward pays once, and one that never reads it never holds the dense product. While the factors train it is
        built at every read, as part of the graph.
        """
        factors = (self.A.weight, self.B.weight)
        if torch.is_grad_enabled() and any(factor.requires_grad for factor in factors):
            return self.B.weight @ self.A.weight
        key = tuple((factor._version, factor.data_ptr()) for factor in factors)
        if getattr(self, "_product_key", None) != key:
            with torch.no_grad():
                self._product = self.B.weight @ self.A.weight
            self._product_key = key
        return self._product

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.B.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@register_compressor("lowrank")
class LowRankFactorizer(FactorCompressor):
    """Rank-r factors of W; r is ``rank`` or ``round(rank_ratio · min(out, in))`` (at least 1)."""

    Options = LowRankOptions
    example_options = ({"rank": 3}, {"rank_ratio": 0.25})

    def rank_for(self, out_features: int, in_features: int) -> int:
        if self.options.rank is not None:
            return self.options.rank
        return max(1, round(self.options.rank_ratio * min(out_features, in_features)))

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        rank, bound = self.rank_for(out_features, in_features), max_compressing_rank(out_features, in_features)
        if rank <= bound:
            return
        given = f"rank={self.options.rank}" if self.options.rank is not None else f"rank_ratio={self.options.rank_ratio}"
        if bound == 0:
            raise UnsupportedLayerError(
                f"layer {name!r} of shape ({out_features}, {in_features}) cannot be factorised smaller: even rank 1 "
                f"stores {out_features + in_features} numbers for its {out_features * in_features}. Exclude it with "
                "exclude_modules."
            )
        raise ValueError(
            f"{given} gives rank {rank} for layer {name!r} of shape ({out_features}, {in_features}), whose factors "
            f"(rank·(out + in) = {rank * (out_features + in_features)} numbers) are not smaller than the weight "
            f"({out_features * in_features}); the rank must be at most {bound} to compress. Lower it or exclude the layer."
        )

    def init_params(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        rank = self.rank_for(*weight.shape)
        # The SVD runs in float32 whatever the weight dtype: bf16/fp16 SVDs are unsupported or inaccurate.
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        factor_a = vh[:rank]  # (r, in)
        factor_b = u[:, :rank] * s[:rank]  # (out, r): singular values folded into B
        return {"A": factor_a.to(weight.dtype).contiguous(), "B": factor_b.to(weight.dtype).contiguous()}

    def compose(self, params):
        return params["B"] @ params["A"]

    def compressed_forward(self, x, params, bias):
        return F.linear(F.linear(x, params["A"]), params["B"], bias)

    def blended_forward(self, x, weight, params, bias, beta):
        out_features, in_features = weight.shape
        tokens = x.numel() // in_features
        if out_features * in_features <= tokens * (out_features + in_features):
            # Weight space: building B·A (out·in·r multiply-adds) is cheaper than B(Ax) (tokens·r·(out+in)); C + β·(W − C)
            # then in place, one full-size allocation (under autocast B·A is 16-bit, and so is the blend).
            compressed = params["B"] @ params["A"]
            return F.linear(x, compressed.lerp_(weight.to(compressed.dtype), beta), bias)
        # Activation space: few tokens, the two thin matmuls are cheaper than building B·A.
        return torch.lerp(self.compressed_forward(x, params, bias), F.linear(x, weight, bias), beta)

    def setting(self) -> str:
        if self.options.rank is not None:
            return f"rank {self.options.rank}"
        return f"rank_ratio {self.options.rank_ratio:g}"

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

    def pack(self, weight, params):
        return {"A": params["A"].detach().clone(), "B": params["B"].detach().clone()}

    def unpacked_weight(self, tensors, out_features, in_features):
        self._check(tensors, out_features, in_features)
        return tensors["B"] @ tensors["A"]

    def unpack(self, tensors, layer):
        self._check(tensors, *linear_shape(layer))
        return LowRankLinear.from_factors(tensors["A"], tensors["B"], layer.bias)

    def _check(self, tensors, out_features, in_features):
        rank = self.rank_for(out_features, in_features)
        check_packed(self.name, tensors, {"A": (rank, in_features), "B": (out_features, rank)})
