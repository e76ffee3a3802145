"""The compressor contract and its registry.

A compressor turns a dense weight W into its compressed form C (the path g of VCON). It never sees β or a
step count: layers hold β and the trainer sets it. Weights are always passed in ``nn.Linear`` orientation,
``(out_features, in_features)``; layers transpose GPT-2 ``Conv1D`` weights before calling in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..config import VConConfig


@dataclass(frozen=True)
class CompressionStats:
    """Size of one layer's weight before and after compression, as stored compactly.

    ``params_*`` count stored numbers (a pruned layer keeps its non-zeros; a binary layer keeps one sign per
    weight plus its scales); ``bytes_*`` are the bytes of a compact encoding (values + packed bitmask, packed
    sign bits + scales, or the two factors). Biases are unchanged by every method and are not counted.
    """

    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    setting: str
    metrics: dict[str, float] = field(default_factory=dict)  # logged as vcon/<name>, e.g. {"sparsity": 0.9}


class Compressor:
    """How one compression method builds C from W.

    Subclasses set ``name`` and implement :meth:`compressed_weight` and :meth:`stats`; they may override
    :meth:`check_layer`, :meth:`init_params` and :meth:`compressed_forward`.

    ``straight_through = True`` means C is a function of the latent dense weight W alone: the layer evaluates C
    without autograd and passes the gradient of the blended weight to W unchanged (straight-through
    estimator), as the authors do for pruning and binary weights. ``False`` means C is built from trainable
    tensors of its own (from :meth:`init_params`) and autograd differentiates through it.
    """

    name: ClassVar[str]
    straight_through: ClassVar[bool] = True

    def __init__(self, config: "VConConfig") -> None:
        self.config = config

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        """Raise ``ValueError`` naming layer ``name`` if it cannot be compressed with this config.

        Called for every targeted layer before any module is replaced.
        """

    def init_params(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra trainable tensors of the compressed path, built from W ``(out, in)``; must not mutate W."""
        return {}

    def compressed_weight(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """C ``(out, in)`` from W ``(out, in)`` and the tensors of :meth:`init_params`; must not mutate them."""
        raise NotImplementedError

    def compressed_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        params: dict[str, torch.Tensor],
        bias: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """g(x): the compressed layer alone. Override when C has a cheaper factored form."""
        return F.linear(x, self.compressed_weight(weight, params), bias)

    def stats(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> CompressionStats:
        """Sizes before and after, from the current W and params."""
        raise NotImplementedError


def packed_bits_bytes(count: int) -> int:
    """Bytes needed to store ``count`` bits, 8 per byte."""
    return math.ceil(count / 8)


_REGISTRY: dict[str, type[Compressor]] = {}


def register_compressor(name: str) -> Callable[[type[Compressor]], type[Compressor]]:
    """Class decorator: make a compressor available as ``VConConfig(method=name)``."""

    def register(cls: type[Compressor]) -> type[Compressor]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def available_compressors() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_compressor(config: "VConConfig") -> Compressor:
    """The compressor for ``config.method``.

    Raises:
        ValueError: for an unregistered method, listing the known ones.
    """
    try:
        cls = _REGISTRY[config.method]
    except KeyError:
        raise ValueError(
            f"method={config.method!r} is not known; use one of: {', '.join(available_compressors())}."
        ) from None
    return cls(config)
