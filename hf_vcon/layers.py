"""``VConLinear``: one Linear/Conv1D layer running VCON's blend ``β·f(x) + (1−β)·g(x)``.

For a linear layer the blend of outputs is a blend of weights (the bias is shared):
``β(Wx + b) + (1−β)(Cx + b) = (βW + (1−β)C)x + b``, so the layer runs one matmul with an effective weight,
never two forward passes, and never swaps ``weight.data``.

Cost (see ``benchmarks/overhead.py``): for compressions recomputed from W (prune, binary) what C needs besides W
(the pruning cut, the scale) is computed once per optimizer step and cached; the effective weight is rebuilt in
backward instead of being kept alive between forward and backward (under autocast its 16-bit copy is kept, as
autocast keeps a plain Linear's). Once β = 0 a low-rank layer computes only
``B(Ax)``; :func:`hf_vcon.release_dense_paths` then stops the dense W from receiving gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .peft_layers import check_not_inside_vcon
from .compressors import Compressor
from .errors import VConError
from .linears import (
    LINEAR_TYPES,
    is_conv1d,
    linear_shape,
    linear_weight,
    resized_like,
    stored_orientation,
    write_weight,
)
from .state import replace_module


class _StraightThroughLinear(torch.autograd.Function):
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
        ctx.state = state  # a cut, mask or scale computed without autograd: neither an input nor an output
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


class VConLinear(nn.Module):
    """VCON wrapper of an ``nn.Linear`` or transformers ``Conv1D`` (kept as ``base_layer``, PEFT-style).

    The original path f is ``base_layer`` with its latent dense weight W; the compressed path g is the
    compressor's C, with any trainable tensors of g registered here as ``vcon_<name>`` (low-rank: ``vcon_A``
    ``(r, in)``, ``vcon_B`` ``(out, r)``). β is set from outside (:func:`hf_vcon.set_beta` or the trainer); it is
    not part of the state dict, since it is a function of the optimizer step.

    Args:
        base_layer: the layer to wrap; its parameters are reused, not copied.
        compressor: the compression of g (shared by the layers with the same setting).
        recompute_every: refresh what C needs besides W every this many optimizer steps (see ``VConConfig``).
        kept_only: train only the weights C keeps (gradual magnitude pruning); else straight-through.
    """

    def __init__(self, base_layer: nn.Module, compressor: Compressor, *, recompute_every: int = 1,
                 kept_only: bool = False) -> None:
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"VConLinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.compressor = compressor
        self.recompute_every = recompute_every
        self.kept_only = kept_only
        self.beta = 1.0
        self.optimizer_step: Optional[int] = None  # set by hf_vcon.set_step; keys the compression-state cache
        self.dense_released = False  # set by hf_vcon.release_dense_paths
        self._state = None
        self._state_key: Optional[tuple] = None
        self._state_memo: dict = {}  # the compressor's hints from one step to the next
        trainable = base_layer.weight.requires_grad
        for key, tensor in compressor.init_params(self.latent_weight()).items():
            self.register_parameter(f"vcon_{key}", nn.Parameter(tensor, requires_grad=trainable))

    # ------------------------------------------------------------------------------------------- views
    @property
    def is_conv1d(self) -> bool:
        return is_conv1d(self.base_layer)

    @property
    def weight(self) -> nn.Parameter:
        """The latent dense weight W as the base layer stores it (Conv1D: ``(in, out)``)."""
        audit = ForwardAudit.active
        if audit is not None and id(self) not in audit.ran:
            audit.read.add(id(self))
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.base_layer.bias

    @property
    def out_features(self) -> int:
        return linear_shape(self.base_layer)[0]

    @property
    def in_features(self) -> int:
        return linear_shape(self.base_layer)[1]

    def latent_weight(self) -> torch.Tensor:
        """W in Linear orientation ``(out, in)``; a transposed view for Conv1D."""
        return linear_weight(self.base_layer)

    def compressed_params(self) -> dict[str, torch.Tensor]:
        """The compressed path's own tensors, keyed as the compressor named them (``{"A": …, "B": …}``)."""
        return {name[len("vcon_"):]: param for name, param in self.named_parameters(recurse=False)}

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
        self.beta = float(beta)

    def compression_state(self):
        """What C(W) needs besides W (prune: the cut or keep-mask; binary: the scale), cached for one optimizer step.

        The cache is keyed on the optimizer step given by :func:`hf_vcon.set_step` and on W's version counter
        (every in-place update of W, as optimizers make, bumps it), so micro-batches of one accumulation window
        and gradient-checkpoint recomputation reuse it. With ``recompute_every=k`` and a step set, it is refreshed
        only every k optimizer steps.
        """
        weight = self.latent_weight()
        frozen = self.recompute_every > 1 and self.optimizer_step is not None
        if frozen:
            key: tuple = ("every", self.optimizer_step // self.recompute_every, weight.data_ptr(), id(self.compressor))
        else:
            key = ("version", self.optimizer_step, weight._version, weight.data_ptr(), id(self.compressor),
                   self.compressor.state_token())
        if self._state is None or self._state_key != key:
            with torch.no_grad():
                self._state = self.compressor.compression_state(weight.detach(), self._state_memo, frozen=frozen)
            self._state_key = key
        return self._state

    def compressed_weight(self) -> torch.Tensor:
        """C ``(out, in)``: the weight of g alone (β = 0), without autograd."""
        return self.compressor.compressed_weight(self.latent_weight(), self.compressed_params())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ForwardAudit.active is not None:
            ForwardAudit.active.ran.add(id(self))
        if not isinstance(self.base_layer, LINEAR_TYPES):  # an adapter was put inside this layer after patching
            check_not_inside_vcon(self)
        if self.beta == 1.0:  # f alone
            unused = list(self.compressed_params().values()) if self.training else []
            return keep_in_graph(self.base_layer(x), unused)
        if self.compressor.trains_straight_through:  # β·W + (1−β)·C(W), one matmul, gradient straight through to W
            # On 2-D input: the function's output is then a fresh tensor, and a view of it (the caller's shape) may be
            # written in place, as wav2vec2's masking does; autograd forbids that on a custom function's own views.
            flat = _StraightThroughLinear.apply(x.reshape(-1, x.shape[-1]), self.latent_weight(), self.bias,
                                                self.compression_state(), self.compressor, self.beta, self.kept_only)
            return flat.view(*x.shape[:-1], flat.shape[-1])
        params = self.compressed_params()
        if self.beta == 0.0:  # g alone, in its cheaper form; W is only touched to keep DDP's reducer whole
            output = self.compressor.compressed_forward(x, params, self.bias)
            return keep_in_graph(output, [self.weight] if self.training else [])
        return self.compressor.blended_forward(x, self.latent_weight(), params, self.bias, self.beta)

    # ---------------------------------------------------------------- the unit's tensors, for the exports
    def state_keys(self, name: str) -> tuple[str, dict[str, str]]:
        """The keys of W and of the compressed path's tensors in the (layer-wise) state dict, for layer ``name``."""
        return f"{name}.base_layer.weight", {key: f"{name}.vcon_{key}" for key in self.compressed_params()}

    def replaced_keys(self, name: str) -> tuple[set[str], dict[str, str]]:
        """The patched model's keys a plain model does not have, and the base layer's other keys → their plain names."""
        dropped, renamed = set(), {}
        for local_key in self.state_dict(keep_vars=True):
            if local_key.startswith("base_layer.") and local_key != "base_layer.weight":
                renamed[f"{name}.{local_key}"] = f"{name}.{local_key[len('base_layer.'):]}"
            else:
                dropped.add(f"{name}.{local_key}")
        return dropped, renamed

    def merged_key(self, name: str) -> str:
        return f"{name}.weight"

    def merged_state(self, name: str, weight: torch.Tensor, params: dict[str, torch.Tensor], merged: dict,
                     coupled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The merged model's tensors of layer ``name`` from W ``(out, in)`` and params: its weight, and its bias where
        the compression changes it (``merged`` holds the bias so far; ``coupled`` every layer's W, by name)."""
        bias_key = f"{name}.bias"
        bias = merged.get(bias_key)
        compressed, new_bias = self.compressor.merged_tensors(weight, params, bias, coupled)
        tensors = {self.merged_key(name): self.stored(compressed)}
        if new_bias is not bias:
            tensors[bias_key] = new_bias.contiguous()
        return tensors

    def describe(self) -> dict:
        """What the compact format records to rebuild this layer."""
        return {"kind": "linear", "module": type(self.base_layer).__name__, "shape": [self.out_features, self.in_features]}

    def oriented(self, stored: torch.Tensor) -> torch.Tensor:
        """A tensor stored as the base layer stores its weight, in Linear orientation ``(out, in)``."""
        return linear_weight(self.base_layer, stored)

    def stored(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight ``(out, in)`` as the base layer stores it."""
        return stored_orientation(self.base_layer, weight)

    def compress(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compressor.compressed_weight(weight, params)

    def stats(self, weight: torch.Tensor, params: dict[str, torch.Tensor]):
        return self.compressor.stats(weight, params)

    def pack(self, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.compressor.pack(weight, params)

    # -------------------------------------------------------------------------------------- lifecycle
    def attach_to(self, model: nn.Module, name: str) -> None:
        replace_module(model, name, self)

    def detach_from(self, model: nn.Module, name: str, merge: bool) -> None:
        replace_module(model, name, self.merged() if merge else self.base_layer)

    def merged_tensors(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The merged layer's weight ``(out', in')`` and bias (the layer's own shapes unless the compression changes
        them), without autograd."""
        params = {key: value.detach() for key, value in self.compressed_params().items()}
        bias = None if self.bias is None else self.bias.detach()
        with torch.no_grad():
            return self.compressor.merged_tensors(self.latent_weight().detach(), params, bias)

    def merged(self) -> nn.Module:
        """The base layer with C written into its weight (in place): the compressed layer, plain again; a new, smaller
        layer of the same type where the compression removes rows or columns.

        Its weight trains if any tensor of this layer did (a released or frozen dense copy becomes trainable again
        when the factors it now holds were).
        """
        trainable = any(param.requires_grad for param in self.parameters())
        weight, bias = self.merged_tensors()
        same_bias = bias is None or bias.shape == self.bias.shape
        if tuple(weight.shape) == (self.out_features, self.in_features) and same_bias:
            write_weight(self.base_layer, weight)
            if bias is not None and self.bias is not None and bias.data_ptr() != self.bias.data_ptr():
                with torch.no_grad():
                    self.base_layer.bias.copy_(bias)
            layer = self.base_layer
        else:
            layer = resized_like(self.base_layer, weight, bias)
        layer.weight.requires_grad_(trainable)
        return layer

    def extra_repr(self) -> str:
        released = ", dense path released" if self.dense_released else ""
        return f"method={self.compressor.name}, beta={self.beta:.4g}{released}"
