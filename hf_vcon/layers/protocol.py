"""The protocol every VCON unit shares, defined once: β, the cached compression state, the blend's autograd functions,
the compressed path's tensors, and sizes and packing slice by slice.

A unit holds a latent dense weight W in Linear orientation ``(out, in)``, or a stack of them ``(experts, out, in)``
(:attr:`VConUnit.stacked`), and a compressor. :class:`~hf_vcon.VConLinear` replaces a Linear/Conv1D module;
:class:`~hf_vcon.layers.weight.VConWeight` parametrizes a weight that model code reads directly. They differ in how
they sit in the model and run (a module's forward, or a parametrization) and agree on everything here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..compressors import CompressionStats, Compressor
from ..errors import VConError

DENSE, BLENDING, COMPRESSED = "dense", "blending", "compressed"


def _compiling() -> bool:
    """Whether torch.compile is tracing the caller (``torch.compiler.is_compiling`` from torch 2.3 on)."""
    check = getattr(torch.compiler, "is_compiling", None)
    if check is None:
        from torch._dynamo import is_compiling as check
    return check()


def phase_of(beta: float) -> str:
    """The phase a β puts a holder in: ``"dense"`` (β = 1: f alone), ``"compressed"`` (β = 0: g alone) or
    ``"blending"``."""
    return DENSE if beta == 1.0 else COMPRESSED if beta == 0.0 else BLENDING


class HoldsBeta(nn.Module):
    """β, held three ways by the modules that blend (units and blocks).

    ``beta``: the Python float, for reports and checks. ``vcon_beta``: a 0-d float32 buffer on the module's device
    that the forward reads while blending, updated in place, so a step never turns a host float into a new device
    value and a compiled graph (or a CUDA graph) reads the same tensor at every step instead of being specialised on
    β. ``phase``: ``dense`` / ``blending`` / ``compressed`` (:func:`phase_of`), which changes twice per transition and
    alone decides the forward's branches. The buffer is not persistent: β is a function of the optimizer step, never
    in the state dict (checkpoints of earlier versions load unchanged), and it stays float32 when the module is cast.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("vcon_beta", torch.ones((), dtype=torch.float32), persistent=False)
        self._beta = 1.0
        self.phase = DENSE

    @property
    def beta(self) -> float:
        return self._beta

    def _store_beta(self, beta: float) -> None:
        self._beta = float(beta)
        with torch.no_grad():
            self.vcon_beta.fill_(self._beta)
        self.phase = phase_of(self._beta)

    def blend_weight(self):
        """β as the forward uses it: the tensor while blending, the float 0.0 once compressed."""
        return self.vcon_beta if self.phase == BLENDING else 0.0

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        beta = self._buffers.get("vcon_beta")
        if beta is not None:  # model.half(), .to(bfloat16), .to_empty(): β keeps its precision and its value
            self._buffers["vcon_beta"] = torch.full((), self._beta, dtype=torch.float32, device=beta.device)
        return result


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on ``device_type`` now; ``None`` outside autocast."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if enabled else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


class ForwardAudit:
    """While active (the model's first forward after patching), which VCON layers ran and whose weight model code
    read from outside their forward: a layer read but never run is bypassed by the model (a wrong result)."""

    active: Optional["ForwardAudit"] = None

    def __init__(self) -> None:
        self.ran: set[int] = set()
        self.read: set[int] = set()


def keep_in_graph(output: torch.Tensor, unused: list[torch.Tensor]) -> torch.Tensor:
    """Give ``unused`` trainable tensors an exact zero gradient without reading more than one element of each.

    DistributedDataParallel without ``find_unused_parameters`` fails when a trainable parameter gets no
    gradient; a path that contributes 0 (β = 1 for g, β = 0 for f) must still be part of the graph.
    """
    touched = [tensor.reshape(-1)[:1].sum() for tensor in unused if tensor.requires_grad]
    if not touched:
        return output
    return output + 0.0 * torch.stack(touched).sum().to(output.dtype)


# ------------------------------------------------------------------------- the blend's autograd functions
class StraightThroughLinear(torch.autograd.Function):
    """``F.linear(x, blend(W, state, β), b)`` whose weight gradient reaches W unchanged (STE), or only where C keeps
    W when ``kept_only`` (gradual magnitude pruning).

    Only x, W (a parameter: no copy) and the small compression state are saved; the effective weight is rebuilt
    in backward for the input gradient, so no full-size temporary lives from forward to backward. Under autocast
    the matmul runs in 16 bits, and like a plain Linear there (whose weight cast autocast keeps for backward) the
    16-bit effective weight and input are saved instead: no rebuild, no casts in backward, and the memory of a
    plain Linear under autocast.
    """

    @staticmethod
    def forward(ctx, x, latent, bias, state, compressor, beta: float, kept_only: bool):
        ctx.compressor, ctx.beta, ctx.kept_only, ctx.has_bias = compressor, beta, kept_only, bias is not None
        ctx.state = state  # a mask or scale computed without autograd: neither an input nor an output
        ctx.x_dtype = x.dtype
        with torch.no_grad():
            weight = compressor.blend(latent, state, beta)
        low = autocast_dtype(x.device.type)
        cast = low is not None and low != weight.dtype
        if cast:
            weight, x = weight.to(low), x.to(low)
        keep_weight = cast and ctx.needs_input_grad[0]  # the 16-bit copy serves the input gradient alone
        ctx.save_for_backward(x, latent, *([weight] if keep_weight else []))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, latent, *saved = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        dtype = grad_output.dtype  # under autocast the forward matmul ran in a lower precision
        if ctx.needs_input_grad[0]:
            weight = saved[0] if saved else ctx.compressor.blend(latent, ctx.state, ctx.beta).to(dtype)  # (out, in)
            grad_x = (grad_output @ weight).to(ctx.x_dtype)
            del weight
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])  # (tokens, out)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_2d.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(latent.dtype)  # (out, in)
            if ctx.kept_only:
                grad_weight = grad_weight * ctx.compressor.kept_mask(latent, ctx.state)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(dim=0).to(latent.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


class StraightThroughWeight(torch.autograd.Function):
    """β·W + (1−β)·C(W) from the cached state; the gradient reaches W unchanged, or only where C keeps W when
    ``kept_only``. ``per_slice``: ``latent`` is ``(slices, out, in)`` and ``state`` one state per slice (a compressor
    that takes no leading dimensions); else ``state`` is the state of the whole ``latent``, in one call."""

    @staticmethod
    def forward(ctx, latent, state, compressor, beta, kept_only: bool, per_slice: bool):
        ctx.state, ctx.compressor, ctx.kept_only, ctx.per_slice = state, compressor, kept_only, per_slice
        ctx.save_for_backward(latent)
        with torch.no_grad():
            if not per_slice:
                return compressor.blend(latent, state, beta)
            return torch.stack([compressor.blend(w, slice_state, beta) for w, slice_state in zip(latent, state)])

    @staticmethod
    def backward(ctx, grad):
        if ctx.kept_only:
            (latent,) = ctx.saved_tensors
            if ctx.per_slice:
                kept = torch.stack([ctx.compressor.kept_mask(w, state) for w, state in zip(latent, ctx.state)])
            else:
                kept = ctx.compressor.kept_mask(latent, ctx.state)
            grad = grad * kept
        return grad, None, None, None, None, None


# -------------------------------------------------------------------------------------------- the unit
class VConUnit(HoldsBeta):
    """The base of the VCON units: what a unit is to the verbs, the trainer and the exports.

    Subclasses provide ``weight`` (the latent W as stored), :meth:`latent_weight` (W in Linear orientation),
    ``forward``, and the model-facing methods (``attach_to``, ``detach_from``, ``merged_state``, ``state_keys``,
    ``replaced_keys``, ``describe``, ``oriented``, ``stored``). Everything else is defined here once.

    Args:
        compressor: the compression of g (shared by the units with the same setting).
        recompute_every: refresh what C needs besides W every this many optimizer steps (see ``VConConfig``).
        kept_only: train only the weights C keeps (gradual magnitude pruning); else straight-through.
    """

    stacked: bool = False  # W is a stack of slices (fused experts), each compressed on its own

    def __init__(self, compressor: Compressor, *, recompute_every: int = 1, kept_only: bool = False) -> None:
        super().__init__()
        self.compressor = compressor
        self.recompute_every = recompute_every
        self.kept_only = kept_only
        self.optimizer_step: Optional[int] = None  # set by hf_vcon.set_step; keys the compression-state cache
        self.dense_released = False  # set by hf_vcon.release_dense_paths
        self._states: Any = None  # see unit_state
        self._state_key: Optional[tuple] = None
        self._driven = False  # set_step refreshes the state at every step
        self._memos: list[dict] = []  # the compressor's hints from one step to the next, one per slice

    def _register_compressed_params(self, latent: torch.Tensor, trainable: bool) -> None:
        """Register the compressor's initial tensors of g as ``vcon_<key>`` (stacked over slices)."""
        self._latent_shape = tuple(latent.shape)
        initial = [self.compressor.init_params(weight) for weight in self._slices(latent.detach())]
        for key in initial[0]:
            tensor = torch.stack([params[key] for params in initial]) if self.stacked else initial[0][key]
            self.register_parameter(f"vcon_{key}", nn.Parameter(tensor, requires_grad=trainable))

    # ------------------------------------------------------------------------------------------- views
    def latent_weight(self) -> torch.Tensor:
        """W in Linear orientation, ``(out, in)`` or ``(experts, out, in)``."""
        raise NotImplementedError

    def fetched_with(self) -> nn.Module:
        """The module whose forward reads W and this unit's ``vcon_*`` tensors together: a sharding engine that
        gathers a module's parameters for its forward (DeepSpeed ZeRO-3) must gather this one whole."""
        return self

    @property
    def num_slices(self) -> int:
        return self.latent_weight().shape[0] if self.stacked else 1

    def _slices(self, weight: torch.Tensor) -> list[torch.Tensor]:
        return list(weight.unbind(0)) if self.stacked else [weight]

    def _stack(self, slices: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(slices) if self.stacked else slices[0]

    def compressed_params(self) -> dict[str, torch.Tensor]:
        """The compressed path's own tensors, keyed as the compressor named them (``{"A": …, "B": …}``)."""
        return {name[len("vcon_"):]: param for name, param in self.named_parameters(recurse=False)}

    def slice_params(self, index: int, params: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """The compressed path's tensors of slice ``index`` (all of them for an unstacked unit)."""
        params = self.compressed_params() if params is None else params
        return {key: value[index] for key, value in params.items()} if self.stacked else params

    def compressed_weight(self) -> torch.Tensor:
        """C in Linear orientation (slice by slice): the weight of g alone (β = 0)."""
        return self.compress(self.latent_weight().detach(), self.compressed_params())

    # ------------------------------------------------------------------------------------------ maths
    def set_beta(self, beta: float) -> None:
        """Set β, the weight of the original path, in [0, 1]."""
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta={beta!r} must be in [0, 1].")
        if beta > 0.0 and self.dense_released:
            raise VConError(
                f"beta={beta!r} needs the dense path, which release_dense_paths() froze; rebuild the model (or resume "
                "from a checkpoint) to train it again."
            )
        self._store_beta(beta)

    def state_cache_key(self, weight: torch.Tensor) -> tuple[bool, tuple]:
        """``(frozen, key)``: whether the state is held for ``recompute_every`` steps, and what it is valid for.

        The key holds the optimizer step given by :func:`hf_vcon.set_step` and W's version counter (every in-place
        update of W, as optimizers make, bumps it), so micro-batches of one accumulation window and
        gradient-checkpoint recomputation reuse the state; and the compressor's :meth:`state_token` (a coupled
        compression: its group's weights). With ``recompute_every=k`` and a step set, it changes every k steps.
        """
        frozen = self.recompute_every > 1 and self.optimizer_step is not None
        if frozen:
            return True, ("every", self.optimizer_step // self.recompute_every, weight.data_ptr(), id(self.compressor))
        return False, ("version", self.optimizer_step, weight._version, weight.data_ptr(), id(self.compressor),
                       self.compressor.state_token())

    @property
    def whole_state(self) -> bool:
        """The compressor takes W with its leading (expert) dimension: one state for the whole weight, one call."""
        return not self.stacked or getattr(self.compressor, "accepts_leading_dims", False)

    def needs_state(self) -> bool:
        """Whether the forward reads a compression state now (straight-through compressions once β < 1)."""
        return self.compressor.trains_straight_through and self.phase != DENSE

    def unit_state(self, weight: Optional[torch.Tensor] = None) -> Any:
        """The state the forward reads: of the whole W (:attr:`whole_state`), else a list with one per slice; cached
        under :meth:`state_cache_key`, computed when the key changed.

        :func:`hf_vcon.set_step` refreshes every layer's state once per optimizer step (:meth:`refresh_state`,
        batched across layers), so the forward finds it ready. Under ``torch.compile`` the forward reads the cache
        without checking its key (nothing of the check is traceable), which :func:`~hf_vcon.set_step` keeps fresh.
        """
        if _compiling() and self._states is not None and self._driven:
            return self._states
        weight = self.latent_weight() if weight is None else weight
        frozen, key = self.state_cache_key(weight)
        if self._states is None or self._state_key != key:
            self._set_state(self._computed_state(weight.detach(), frozen), key)
        return self._states

    def _computed_state(self, weight: torch.Tensor, frozen: bool) -> Any:
        if len(self._memos) != self.num_slices:
            self._memos = [{} for _ in range(self.num_slices)]
        with torch.no_grad():
            if self.whole_state:
                return self.compressor.compression_state(weight, self._memos[0], frozen=frozen)
            return [self.compressor.compression_state(w, memo, frozen=frozen)
                    for w, memo in zip(self._slices(weight), self._memos)]

    def _set_state(self, state: Any, key: tuple) -> None:
        self._states, self._state_key = state, key

    def due_state(self) -> Optional[tuple]:
        """``(weight, frozen, key)`` when the forward will read a state that the cache does not hold (W detached,
        whole), else ``None``: what :func:`refresh_states` computes. A weight that is not whole here (sharded by
        FSDP or ZeRO-3 outside the forward) is left to the forward, which sees it gathered."""
        self._driven = True
        if not self.needs_state():
            return None
        weight = self.latent_weight().detach()
        if type(weight) is not torch.Tensor or tuple(weight.shape) != self._latent_shape:
            return None
        frozen, key = self.state_cache_key(weight)
        if self._states is not None and self._state_key == key:
            return None
        return weight, frozen, key

    def frozen_state(self) -> Optional[tuple[int, Any]]:
        """``(window, state)``: the state held for the ``recompute_every`` window in force (computed from W at the
        window's first step), to be saved with a checkpoint; ``None`` when no state is held for several steps."""
        if self._states is None or self._state_key is None or self._state_key[0] != "every":
            return None
        return self._state_key[1], self._states

    def restore_frozen_state(self, window: int, state: Any) -> None:
        """Hold ``state`` for ``window`` (from :meth:`frozen_state` of the run being resumed): the steps left in that
        window then use the state the uninterrupted run used, not one computed from the resumed W."""
        weight = self.latent_weight()
        self._set_state(state, ("every", window, weight.data_ptr(), id(self.compressor)))

    def compression_states(self, weight: Optional[torch.Tensor] = None) -> list:
        """What C(W) needs besides W, one entry per slice (prune: the keep-mask; binary: the scale), cached under
        :meth:`state_cache_key`."""
        state = self.unit_state(weight)
        if not self.whole_state:
            return state
        return [_state_at(state, index) for index in range(self.num_slices)] if self.stacked else [state]

    def compression_state(self) -> Any:
        """The compression state of an unstacked unit (see :meth:`compression_states`)."""
        return self.compression_states()[0]

    # ------------------------------------------------------------ sizes and packing, slice by slice
    def compress(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """C of W ``(out, in)`` / ``(experts, out, in)`` with the compressed path's tensors ``params``."""
        return self._stack([self.compressor.compressed_weight(w, self.slice_params(index, params))
                            for index, w in enumerate(self._slices(weight))])

    def stats(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> CompressionStats:
        """The slices' sizes added up; metrics averaged by parameter count."""
        parts = [self.compressor.stats(w, self.slice_params(index, params)) for index, w in enumerate(self._slices(weight))]
        if len(parts) == 1:
            return parts[0]
        total = sum(part.params_before for part in parts)
        metrics = {key: sum(part.metrics[key] * part.params_before for part in parts) / total for key in parts[0].metrics}
        return CompressionStats(total, sum(p.params_after for p in parts), sum(p.bytes_before for p in parts),
                                sum(p.bytes_after for p in parts), setting=parts[0].setting, metrics=metrics)

    def pack(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compressor's packed tensors of every slice, keyed ``<expert>.<key>`` for a stacked unit."""
        if not self.stacked:
            return self.compressor.pack(weight, params)
        return {f"{index}.{key}": value for index, w in enumerate(self._slices(weight))
                for key, value in self.compressor.pack(w, self.slice_params(index, params)).items()}

    def _repr_method(self) -> str:
        released = ", dense path released" if self.dense_released else ""
        return f"method={self.compressor.name}, beta={self.beta:.4g}{released}"


# ----------------------------------------------------------------------------- states, once per optimizer step
def refresh_states(units: list, batched: Optional[bool] = None) -> None:
    """Compute the compression state every unit's forward will read at this optimizer step, once, outside the
    forward (:func:`hf_vcon.set_step` calls this), so that forward and backward only read cached tensors.

    Units whose compressors take leading dimensions (:attr:`~hf_vcon.compressors.WeightCompressor.accepts_leading_dims`)
    and agree on class, options, shape, dtype and device are stacked ``(units, out, in)`` and compressed in one call
    (one selection for all of a group's pruning thresholds): on a GPU that replaces many small kernels by a few
    large ones. On a CPU stacking only copies the weights, so ``batched`` defaults to "not on a CPU". Either way
    each unit gets the state it would compute alone.
    """
    groups: dict[tuple, list] = {}
    for unit in units:
        due = unit.due_state()
        if due is None:
            continue
        weight, frozen, key = due
        batch = weight.device.type != "cpu" if batched is None else batched
        compressor = unit.compressor
        if batch and unit.whole_state and not unit.stacked and getattr(compressor, "accepts_leading_dims", False) \
                and not compressor.couples_layers:
            group = (type(compressor), compressor.options, tuple(weight.shape), weight.dtype, weight.device, frozen)
            groups.setdefault(group, []).append((unit, weight, key))
        else:
            unit._set_state(unit._computed_state(weight, frozen), key)
    for (*_, frozen), members in groups.items():
        if len(members) == 1:
            unit, weight, key = members[0]
            unit._set_state(unit._computed_state(weight, frozen), key)
            continue
        with torch.no_grad():
            state = members[0][0].compressor.compression_state(torch.stack([weight for _, weight, _ in members]), {},
                                                               frozen=frozen)
        for index, (unit, _, key) in enumerate(members):
            unit._set_state(_state_at(state, index), key)


def _state_at(state: Any, index: int) -> Any:
    """The state of one leading index of a batched state (a tensor, or a tuple of tensors)."""
    if isinstance(state, torch.Tensor):
        return state[index]
    return type(state)(*(part[index] for part in state))
