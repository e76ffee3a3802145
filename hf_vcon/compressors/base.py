"""The compressor contract and its registry.

A compressor turns a dense weight W into its compressed form C (the path g of VCON). It never sees β or a
step count: layers hold β and the trainer sets it. Weights are always passed in ``nn.Linear`` orientation,
``(out_features, in_features)``; layers transpose GPT-2 ``Conv1D`` weights before calling in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

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

    Subclasses set ``name`` and implement :meth:`compressed_weight`, :meth:`stats`, :meth:`pack` and
    :meth:`unpacked_weight` (or :meth:`unpack`); they may override :meth:`check_layer`, :meth:`init_params`,
    :meth:`compressed_forward`, and, for speed, :meth:`compression_state` / :meth:`blend` (straight-through
    methods) or :meth:`blended_forward` (methods with trainable tensors of their own).

    ``straight_through = True`` means C is a function of the latent dense weight W alone: the layer evaluates C
    without autograd and passes the gradient of the blended weight to W unchanged (straight-through
    estimator), as the authors do for pruning and binary weights, unless :meth:`weight_gradient` is overridden
    (gradual magnitude pruning masks it). ``False`` means C is built from trainable
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

    # ------------------------------------------------------------------ training speed (straight-through)
    def compression_state(self, weight: torch.Tensor, memo: Optional[dict] = None) -> Any:
        """What C(W) needs besides W itself, computed without autograd; must not mutate W.

        The layer caches it for one optimizer step (micro-batches of one accumulation window and gradient-
        checkpoint recomputation reuse it), so it should be small: a threshold, a boolean keep-mask, a scale. The
        default is C itself, which is correct for any compression but costs a full copy of W. ``memo`` is a dict
        the layer keeps across steps, for hints that make the next computation cheaper (never for the result).
        """
        return self.compressed_weight(weight, {})

    def blend(self, weight: torch.Tensor, state: Any, beta: float) -> torch.Tensor:
        """β·W + (1−β)·C ``(out, in)`` from W and :meth:`compression_state`; no autograd, nothing mutated.

        Straight-through layers call this in forward and again in backward instead of saving the result, so it
        should allocate as few full-size temporaries as possible (the result itself, ideally).
        """
        return torch.lerp(weight, state, 1.0 - beta)

    def weight_gradient(self, grad: torch.Tensor, weight: torch.Tensor, state: Any) -> torch.Tensor:
        """The gradient W receives, from the gradient of the effective weight: unchanged (straight-through)."""
        return grad

    # --------------------------------------------------------- training speed (own trainable tensors)
    def blended_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        params: dict[str, torch.Tensor],
        bias: Optional[torch.Tensor],
        beta: float,
    ) -> torch.Tensor:
        """β·f(x) + (1−β)·g(x), differentiable in W and params; override with a cheaper equivalent form."""
        return F.linear(x, torch.lerp(weight, self.compressed_weight(weight, params), 1.0 - beta), bias)

    # ----------------------------------------------------------------------------- compact checkpoints
    def pack(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compact tensors that store C(W) exactly (packed bits, kept values, factors…); W ``(out, in)``.

        Keys are short names (``"signs"``, ``"A"``); the values must not share memory with W or params.
        """
        raise NotImplementedError

    def unpacked_weight(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        """C ``(out, in)`` rebuilt from :meth:`pack`'s tensors.

        Raises:
            ValueError: if the tensors do not fit this config and shape (missing or extra keys, wrong shapes).
        """
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], layer: nn.Module) -> nn.Module:
        """The inference module computing ``C·x + b`` for ``layer`` (an ``nn.Linear`` or ``Conv1D`` whose bias
        is already loaded), from :meth:`pack`'s tensors.

        The default writes the dense C into ``layer``'s weight (in place) and returns ``layer``; compressions
        with a cheaper factored form return a new module.

        Raises:
            ValueError: if the tensors do not fit this config and the layer's shape.
        """
        rows, cols = layer.weight.shape
        conv1d = type(layer).__name__ == "Conv1D"  # Conv1D stores (in, out)
        out_features, in_features = (cols, rows) if conv1d else (rows, cols)
        weight = self.unpacked_weight(tensors, out_features, in_features)
        with torch.no_grad():
            layer.weight.copy_(weight.t() if conv1d else weight)
        return layer


def packed_bits_bytes(count: int) -> int:
    """Bytes needed to store ``count`` bits, 8 per byte."""
    return math.ceil(count / 8)


_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # most significant bit first, as numpy.packbits


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as ``uint8`` bytes, 8 bits per byte (row-major, most significant bit first, zero-padded)."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) << _BIT_SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of :func:`pack_bits`'s bytes, as a flat boolean tensor."""
    bits = (packed.reshape(-1, 1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()


def check_packed(
    method: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], optional: tuple[str, ...] = ()
) -> None:
    """Raise ``ValueError`` unless ``tensors`` has exactly the ``expected`` keys (plus any of ``optional``) with
    those shapes (``-1`` in a shape matches any size)."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - set(optional))
    if missing or extra:
        raise ValueError(f"{method}: expected packed tensors {sorted(expected)}, missing {missing}, unexpected {extra}.")
    for key, shape in expected.items():
        actual = tuple(tensors[key].shape)
        if len(actual) != len(shape) or any(want not in (-1, got) for want, got in zip(shape, actual)):
            raise ValueError(f"{method}: packed tensor {key!r} has shape {list(actual)}, expected {list(shape)}.")


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


def compressor_class(method: str) -> type[Compressor]:
    """The registered class for ``method``.

    Raises:
        ValueError: for an unregistered method, listing the known ones.
    """
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ValueError(f"method={method!r} is not known; use one of: {', '.join(available_compressors())}.") from None


def get_compressor(config: "VConConfig") -> Compressor:
    """The compressor for ``config.method``.

    Raises:
        ValueError: for an unregistered method, listing the known ones.
    """
    return compressor_class(config.method)(config)
