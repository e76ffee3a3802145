"""The compressor contract: two families of compression, each with one definition of the compressed weight C.

A compressor turns a layer's dense weight W into the compressed weight C of VCON's path g. It never sees β or an
optimizer step: layers hold β, the transition sets it (:mod:`hf_vcon.patching.transitions`). Weights are always in
``nn.Linear`` orientation ``(out_features, in_features)`` (:mod:`hf_vcon.utils.linears` handles GPT-2's ``Conv1D``).

- :class:`WeightCompressor`: C = C(W) is a function of the latent dense weight alone, recomputed from W as it trains
  (pruning, binary weights). The layer evaluates C without autograd and passes the gradient of the blended weight to
  W unchanged (the straight-through estimator, as the authors of VCON do). One definition: :meth:`~WeightCompressor.compress`.
- :class:`FactorCompressor`: C is built from trainable tensors of the compression's own, initialised from W
  (low-rank factors B·A); autograd differentiates through them. One definition: :meth:`~FactorCompressor.compose`.

Everything else a family offers (``blend``, ``compression_state``, ``compressed_forward``, ``blended_forward``) is
a speed path; the tests check each against the definition for every registered compression. The decisions other
parts of hf_vcon take from the family are named properties: :attr:`trains_straight_through`,
:attr:`recomputes_from_weight`, :attr:`releases_dense_path`, :attr:`copy_trains_latent_weight`.

A compression whose C is an integer grid, C = q·s (binary weights, k-bit quantization), says so with
:meth:`Compressor.integer_scheme` and :meth:`Compressor.integer_form`: the exporters write such layers in the
compressed-tensors format without knowing which compression they came from.

Two more decisions let a compression reach past one layer (structured pruning, :mod:`.structured`):
:attr:`~Compressor.couples_layers` (C of a layer depends on the weights of the layers it is coupled with: each layer
gets a compressor of its own from :meth:`~Compressor.bind_layers`) and :attr:`~Compressor.changes_shapes` (the merged
layer is smaller, :meth:`~Compressor.merged_tensors`, and the model's config changes, :meth:`~Compressor.config_changes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Hashable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.linears import linear_shape, write_weight
from .options import CompressorOptions
from .packing import check_packed

INTEGER_STRATEGIES = ("channel", "group", "tensor")

Beta = Union[float, torch.Tensor]  # β as a layer passes it: the float 0.0 once compressed, else a 0-d float32 tensor


def beta_is_zero(beta: Beta) -> bool:
    """True for the float 0.0 a layer passes once it is compressed (β = 0); a tensor β (blending) is never read, so
    that asking costs no host–device synchronisation."""
    return not isinstance(beta, torch.Tensor) and beta == 0.0


def lerp(start: torch.Tensor, end: torch.Tensor, weight: Beta, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.lerp(start, end, weight)`` for a weight that may be a 0-d float32 tensor, into ``out`` if given.

    For 16-bit tensors ``torch.lerp`` would round a tensor weight to 16 bits first; this computes in float32 and
    rounds once, as ``torch.lerp`` does with a Python weight, so a tensor β gives the result a float β gives.
    """
    if isinstance(weight, torch.Tensor) and start.dtype not in (torch.float32, torch.float64):
        result = torch.lerp(start.float(), end.float(), weight).to(start.dtype)
        return result if out is None else out.copy_(result)
    if out is None:
        return torch.lerp(start, end, weight)
    return out.lerp_(end, weight) if out is start else torch.lerp(start, end, weight, out=out)


@dataclass(frozen=True)
class IntegerScheme:
    """How a layer's C is stored as symmetric integers: ``num_bits``, one scale per ``strategy`` (``"tensor"``,
    ``"channel"``: per output row, ``"group"``: per ``group_size`` consecutive inputs of a row). The codes lie in
    ``[−2^(num_bits−1), 2^(num_bits−1) − 1]``, as compressed-tensors' ``int`` type."""

    num_bits: int
    strategy: str
    group_size: Optional[int] = None  # only for strategy "group"

    def __post_init__(self) -> None:
        if self.strategy not in INTEGER_STRATEGIES or not 1 <= self.num_bits <= 8:
            raise ValueError(f"IntegerScheme({self.num_bits}, {self.strategy!r}): 1-8 bits, strategy one of "
                             f"{', '.join(INTEGER_STRATEGIES)}.")
        if (self.strategy == "group") != (self.group_size is not None):
            raise ValueError("IntegerScheme: group_size is given with strategy 'group', and only then.")

    @property
    def code_range(self) -> tuple[int, int]:
        return -(2 ** (self.num_bits - 1)), 2 ** (self.num_bits - 1) - 1

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        """``(1,)``, ``(out, 1)`` or ``(out, in // group_size)``: compressed-tensors' ``weight_scale`` shape."""
        if self.strategy == "tensor":
            return (1,)
        if self.strategy == "channel":
            return (out_features, 1)
        return (out_features, in_features // self.group_size)


@dataclass(frozen=True)
class IntegerWeight:
    """C = codes · scale for one layer: ``codes`` int8 ``(out, in)`` within the scheme's range, ``scale`` float32 of
    :meth:`IntegerScheme.scale_shape` whose values are exact in C's dtype ``dtype``."""

    scheme: IntegerScheme
    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def expanded_scale(self) -> torch.Tensor:
        """The scale broadcast to ``(out, in)`` (a view where it can be)."""
        out_features, in_features = self.codes.shape
        if self.scheme.strategy == "group":
            return self.scale.repeat_interleave(self.scheme.group_size, dim=1)
        return self.scale.reshape(-1, 1).expand(out_features, in_features)

    def dequantize(self) -> torch.Tensor:
        """C ``(out, in)`` in ``dtype``: the product computed in float32 and rounded once, as the definition of C."""
        return (self.codes.to(torch.float32) * self.expanded_scale()).to(self.dtype)


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
    """What every compression provides. Subclass :class:`WeightCompressor` or :class:`FactorCompressor`, not this.

    Class attributes: ``name`` (set by :func:`~hf_vcon.compressors.register_compressor`), ``Options`` (its
    :class:`~hf_vcon.compressors.options.CompressorOptions` dataclass), ``gradual_option``: the option a gradual
    transition (``transition="gmp"``) raises from 0 to its value (``"sparsity"`` for pruning; a tuple of options that
    ramp together; ``None`` when the compression has no such degree), and ``example_options``: a few settings that
    show its range.

    Defaults that a compression may keep: :meth:`stats`, :meth:`pack` and :meth:`unpacked_weight` store C densely
    (correct for any compression, but no smaller); override them with a compact encoding.
    """

    name: ClassVar[str]
    Options: ClassVar[type[CompressorOptions]] = CompressorOptions
    gradual_option: ClassVar[Union[None, str, tuple[str, ...]]] = None
    # Settings that show the compression's range (dicts of options): the docs and the registry-driven tests use them.
    example_options: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    # The decisions the family takes (see the module docstring); set by the two family classes.
    trains_straight_through: ClassVar[bool]  # forward: one matmul with β·W + (1−β)·C(W), gradient straight to W
    recomputes_from_weight: ClassVar[bool]  # C follows W as it trains: ``recompute_every`` applies
    releases_dense_path: ClassVar[bool]  # at β = 0 the layer never reads W: release_dense_paths may freeze it
    copy_trains_latent_weight: ClassVar[bool]  # block-wise: g's own latent W trains (else g never reads it: frozen)
    couples_layers: ClassVar[bool] = False  # C of a layer depends on other layers' weights: bound per layer
    changes_shapes: ClassVar[bool] = False  # the merged layer has other shapes and the model's config changes

    def __init__(self, options: Optional[CompressorOptions] = None) -> None:
        options = self.Options() if options is None else options
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, not {type(options).__name__}.")
        self.options = options

    def gradual_options(self) -> tuple[str, ...]:
        """The options a gradual transition raises (``gradual_option`` as a tuple)."""
        option = self.gradual_option
        return () if option is None else (option,) if isinstance(option, str) else tuple(option)

    def with_options(self, **changes: Any) -> "Compressor":
        """A compressor of the same class with some options changed (validated)."""
        return type(self)(self.options.replace(**changes))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # ------------------------------------------------------------------------------------------ checks
    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        """Raise ``ValueError`` naming layer ``name`` if it cannot be compressed with these options.

        Called for every targeted layer before any module is replaced.
        """

    @classmethod
    def bind_layers(cls, model: nn.Module, names: list[str],
                    compressors: list["Compressor"]) -> tuple[dict[str, "Compressor"], dict[str, str]]:
        """The compressor of each targeted layer ``names[i]`` (given ``compressors[i]``, one per setting), and the
        layers this compression cannot take with why (``"all-linear"`` leaves them dense, a layer named explicitly
        raises). Called once per compression class, with every layer it targets, before any module is replaced.

        Only compressions that :attr:`couples_layers` override it: they find each layer's group in ``model`` and
        return a compressor bound to it. The default keeps the shared compressors.

        Raises:
            ValueError: naming the layers, if the targeted layers cannot be compressed together as the compression
                needs (a group only partly targeted, say).
        """
        return dict(zip(names, compressors)), {}

    def bind_unit(self, unit: nn.Module) -> None:
        """Called once the VCON unit this compressor compresses is built (a coupled compression reads its group's
        latent weights from the units)."""

    def state_token(self) -> Hashable:
        """What the compression state depends on besides the layer's own weight (a coupled compression: the versions
        of its group's weights); part of the layer's cache key. ``None``: nothing."""
        return None

    def check_gradual(self) -> None:
        """Raise ``ValueError`` if these options cannot be reached gradually (called for ``transition="gmp"``)."""
        if self.gradual_option is None:
            raise ValueError(f"method={self.name!r} has no degree of compression that a gradual transition can raise.")

    # -------------------------------------------------------------------------------------- C and sizes
    def init_params(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trainable tensors of the compressed path, built from W ``(out, in)``; must not mutate W."""
        return {}

    def compressed_weight(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """C ``(out, in)`` from W and the tensors of :meth:`init_params` (no autograd); implemented by each family."""
        raise NotImplementedError

    def stats(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> CompressionStats:
        """Sizes before and after, from the current W and params. The default: C stored dense, no smaller."""
        numel, size = weight.numel(), weight.element_size()
        return CompressionStats(numel, numel, numel * size, numel * size, setting=self.setting())

    def merged_tensors(self, weight: torch.Tensor, params: dict[str, torch.Tensor], bias: Optional[torch.Tensor],
                       coupled: Optional[dict[str, torch.Tensor]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The merged layer's weight ``(out', in')`` and bias, without autograd. The default: C and the bias as they
        are (the shapes of the layer); a compression that :attr:`changes_shapes` returns smaller ones.

        ``coupled`` maps every compressed layer's name to its latent W ``(out, in)`` when the weights come from a state
        dict (FSDP, ZeRO-3); a coupled compression then reads its group there instead of from the modules.
        """
        return self.compressed_weight(weight, params), bias

    def config_changes(self) -> dict[str, Any]:
        """The model-config fields a merged model of this compression has other values in (``{"intermediate_size":
        1536}``); the same for every layer of a model. The default: none."""
        return {}

    def setting(self) -> str:
        """A short description of the options, for summaries (``"sparsity 0.900 (layer)"``)."""
        return ", ".join(f"{key} {value}" for key, value in self.options.to_dict().items()) or self.name

    # ------------------------------------------------------------------------------- compact checkpoints
    def pack(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compact tensors that store C exactly (packed bits, kept values, factors…); W ``(out, in)``.

        Keys are short names (``"signs"``, ``"A"``); the values must not share memory with W or params. The
        default stores C itself.
        """
        return {"weight": self.compressed_weight(weight, params).detach().clone()}

    def unpacked_weight(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        """C ``(out, in)`` rebuilt from :meth:`pack`'s tensors.

        Raises:
            ValueError: if the tensors do not fit these options and shape (missing or extra keys, wrong shapes).
        """
        check_packed(self.name, tensors, {"weight": (out_features, in_features)})
        return tensors["weight"]

    # ------------------------------------------------------------------------------------- integer form
    def integer_scheme(self) -> Optional[IntegerScheme]:
        """The integer grid C lies on with these options, or ``None`` (the default: C is not an integer grid).
        Decided by the options alone, before any weight is read."""
        return None

    def integer_form(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> IntegerWeight:
        """C as integer codes and scales, with ``integer_form(...).dequantize()`` equal to C exactly; only for
        compressions whose :meth:`integer_scheme` is not ``None``."""
        raise NotImplementedError(f"method={self.name!r} has no integer form.")

    def unpack(self, tensors: dict[str, torch.Tensor], layer: nn.Module) -> nn.Module:
        """The inference module computing ``C·x + b`` for ``layer`` (an ``nn.Linear`` or ``Conv1D`` whose bias is
        already loaded), from :meth:`pack`'s tensors.

        The default writes the dense C into ``layer``'s weight (in place) and returns ``layer``; compressions with
        a cheaper factored form return a new module.

        Raises:
            ValueError: if the tensors do not fit these options and the layer's shape.
        """
        write_weight(layer, self.unpacked_weight(tensors, *linear_shape(layer)))
        return layer


class WeightCompressor(Compressor):
    """A compression C = C(W) of the latent dense weight alone (pruning, binary weights), trained straight-through.

    Subclasses implement :meth:`compress`, the definition of C. For speed they may override
    :meth:`compression_state` (what C needs besides W, small and cached by the layer for an optimizer step) with
    :meth:`blend` (β·W + (1−β)·C from W and that state, in few passes); the defaults keep C itself as the state.

    On a GPU the host runs ahead of the device; a training step stays fast when nothing in it reads a device value
    into Python (``float(t)``, ``.item()``, ``torch.equal``, ``if tensor:``) or makes a tensor whose size depends on
    the data (``nonzero``, a boolean-mask gather). The layers compute :meth:`compression_state` once per optimizer
    step, outside the forward, and read it in forward and backward; a compression whose state and blend avoid those
    operations keeps the whole step free of host–device synchronisation (``tests/training/test_sync_free.py``
    checks every registered compression). A compression that reads values still computes the right C, only slower.

    Leading dimensions: a compression that sets :attr:`accepts_leading_dims` takes W ``(..., out, in)`` in
    :meth:`compression_state`, :meth:`blend` and :meth:`kept_mask`, each leading index compressed on its own (the
    experts of a fused ``(experts, out, in)`` weight), and returns states with the same leading dimensions, indexable
    by them (a tensor, or a tuple of tensors); the layers then compress a fused weight in one call instead of one per
    expert. The default (``False``) gets one 2-D weight per call, as before.
    """

    accepts_leading_dims: ClassVar[bool] = False

    trains_straight_through = True
    recomputes_from_weight = True
    releases_dense_path = False
    copy_trains_latent_weight = True

    def compress(self, weight: torch.Tensor) -> torch.Tensor:
        """C ``(out, in)`` from W ``(out, in)``, without autograd; must not mutate W. The definition of C."""
        raise NotImplementedError

    def compressed_weight(self, weight, params=None):
        with torch.no_grad():
            return self.compress(weight.detach())

    def compression_state(self, weight: torch.Tensor, memo: Optional[dict] = None, *, frozen: bool = False) -> Any:
        """What C needs besides W, computed without autograd; must not mutate W.

        ``memo`` is a dict the layer keeps across optimizer steps, for hints that make the next computation cheaper
        (never for the result; a hint read back into Python costs a synchronisation). ``frozen=True`` means the state will be reused for several optimizer steps while W
        moves (``recompute_every > 1``): it must then fix *what* C keeps (a kept set, a scale), not a rule that
        re-selects on the moving W. The default is C itself: correct for any compression, but a full copy of W.
        """
        return self.compress(weight)

    def blend(self, weight: torch.Tensor, state: Any, beta: Beta) -> torch.Tensor:
        """β·W + (1−β)·C ``(out, in)`` from W and :meth:`compression_state`; no autograd, nothing mutated.

        ``beta`` is the float ``0.0`` once the layer is compressed, and while it blends a 0-d float32 tensor on W's
        device, updated in place from one optimizer step to the next (so that a compiled graph is not specialised
        on its value): test it with :func:`beta_is_zero`, never with ``beta == 0`` (reading the tensor's value
        synchronises), and use it as a tensor (:func:`lerp`, ``torch.where``, a product). A float β in (0, 1] is
        still accepted (direct calls).

        Layers call this in forward and again in backward instead of saving the result, so it should allocate as
        few full-size temporaries as possible (the result itself, ideally).
        """
        return lerp(state, weight, beta)

    def kept_mask(self, weight: torch.Tensor, state: Any) -> torch.Tensor:
        """The boolean ``(out, in)`` mask of the weights C keeps, for transitions that train only those
        (gradual magnitude pruning). Only compressions with a ``gradual_option`` need it."""
        raise NotImplementedError(f"method={self.name!r} has no kept set.")


class FactorCompressor(Compressor):
    """A compression whose C is built from trainable tensors of its own (low-rank factors), initialised from W.

    Subclasses implement :meth:`init_params` (the tensors, from W) and :meth:`compose` (the definition of C from
    them); for speed they may override :meth:`compressed_forward` (g alone) and :meth:`blended_forward`.
    """

    trains_straight_through = False
    recomputes_from_weight = False
    releases_dense_path = True
    copy_trains_latent_weight = False

    def compose(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """C ``(out, in)`` from the compression's tensors, differentiable in them. The definition of C."""
        raise NotImplementedError

    def compressed_weight(self, weight, params):
        with torch.no_grad():
            return self.compose(params)

    def compressed_forward(self, x: torch.Tensor, params: dict[str, torch.Tensor],
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
        """g(x): the compressed layer alone, differentiable in params. Override when C has a cheaper factored form."""
        return F.linear(x, self.compose(params), bias)

    def blended_forward(self, x: torch.Tensor, weight: torch.Tensor, params: dict[str, torch.Tensor],
                        bias: Optional[torch.Tensor], beta: Beta) -> torch.Tensor:
        """β·f(x) + (1−β)·g(x), differentiable in W and params; override with a cheaper equivalent form. ``beta``
        is a 0-d float32 tensor while the layer blends (see :meth:`WeightCompressor.blend`)."""
        return F.linear(x, torch.lerp(self.compose(params), weight, beta), bias)
