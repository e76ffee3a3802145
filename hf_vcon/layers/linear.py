"""``VConLinear``: one Linear/Conv1D layer running VCON's blend ``β·f(x) + (1−β)·g(x)``.

For a linear layer the blend of outputs is a blend of weights (the bias is shared):
``β(Wx + b) + (1−β)(Cx + b) = (βW + (1−β)C)x + b``, so the layer runs one matmul with an effective weight,
never two forward passes, and never swaps ``weight.data``.

Cost (see ``benchmarks/overhead.py``): for compressions recomputed from W (prune, binary) what C needs besides W
(the pruning mask, the scale) is computed once per optimizer step, by :func:`hf_vcon.set_step`, and cached; the effective weight is rebuilt in
backward instead of being kept alive between forward and backward (under autocast its 16-bit copy is kept, as
autocast keeps a plain Linear's). Once β = 0 a low-rank layer computes only
``B(Ax)``; :func:`hf_vcon.release_dense_paths` then stops the dense W from receiving gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..compressors import Compressor
from ..compressors.base import lerp
from ..utils.linears import (
    LINEAR_TYPES,
    is_conv1d,
    linear_shape,
    linear_weight,
    resized_like,
    stored_orientation,
    write_weight,
)
from ..utils.modules import replace_module
from ..utils.peft import check_not_inside_vcon
from .protocol import (
    COMPRESSED,
    DENSE,
    ForwardAudit,
    StraightThroughLinear,
    StraightThroughWeight,
    VConUnit,
    keep_in_graph,
)


OBSERVER = "vcon_input_absmax"


class StraightThroughInputs(torch.autograd.Function):
    """Q(x), the compressor's activation quantization, whose gradient reaches x unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x, compressor, module, observed):
        with torch.no_grad():
            return compressor.quantize_inputs(x, module, observed)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class VConLinear(VConUnit):
    """VCON wrapper of an ``nn.Linear`` or transformers ``Conv1D`` (kept as ``base_layer``, PEFT-style).

    The original path f is ``base_layer`` with its latent dense weight W; the compressed path g is the
    compressor's C, with any trainable tensors of g registered here as ``vcon_<name>`` (low-rank: ``vcon_A``
    ``(r, in)``, ``vcon_B`` ``(out, r)``). β is set from outside (:func:`hf_vcon.set_beta` or the trainer); it is
    not part of the state dict, since it is a function of the optimizer step.

    Input observer: where the compression quantizes the inputs with a static per-tensor scale
    (``compressor.observes_inputs``: FP8 static, NVFP4's global scale), the layer keeps ``vcon_input_absmax``, the
    running max|x| of its inputs (compressed-tensors' ``static_minmax``): a 0-d float32 buffer, in the state dict (a
    resumed run continues with it), updated in place with device operations only by every forward in training mode,
    whatever β (so the scale is ready when g starts to count). It starts at 0, "nothing observed"; a forward in
    evaluation mode leaves it alone once set, and sets it from its input while it is 0 (so a model put at β = 0 and
    evaluated quantizes with a scale of its data, not a degenerate one). The scale then follows from it by the
    library's rule (:meth:`~hf_vcon.compressors.quant.Quantizer.static_input_tensors`).

    Args:
        base_layer: the layer to wrap; its parameters are reused, not copied.
        compressor: the compression of g (shared by the layers with the same setting).
        recompute_every: refresh what C needs besides W every this many optimizer steps (see ``VConConfig``).
        kept_only: train only the weights C keeps (gradual magnitude pruning); else straight-through.
    """

    def __init__(self, base_layer: nn.Module, compressor: Compressor, *, recompute_every: int = 1,
                 kept_only: bool = False) -> None:
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"VConLinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}.")
        super().__init__(compressor, recompute_every=recompute_every, kept_only=kept_only)
        self.base_layer = base_layer
        self._register_compressed_params(self.latent_weight(), trainable=base_layer.weight.requires_grad)
        if getattr(compressor, "observes_inputs", False):
            self.register_buffer(OBSERVER, torch.zeros((), dtype=torch.float32, device=base_layer.weight.device))

    @property
    def input_observer(self) -> Optional[torch.Tensor]:
        """The running max|x| of the layer's inputs (a 0-d float32 tensor), or None where Q has no static scale."""
        return self._buffers.get(OBSERVER)

    def _observe(self, x: torch.Tensor, observer: torch.Tensor) -> None:
        """Fold max|x| into the observer, in place, on the device (no host read, no branch on data)."""
        if x.numel() == 0:
            return
        with torch.no_grad():
            low, high = torch.aminmax(x.detach())
            current = torch.maximum(high, low.neg()).float()
            if self.training:
                observer.copy_(torch.maximum(observer, current))
            else:
                observer.copy_(torch.where(observer > 0, observer, current))

    def _apply(self, fn, recurse=True):
        observer = self._buffers.get(OBSERVER)
        result = super()._apply(fn, recurse)
        if observer is not None:  # model.half(), .to(bfloat16): the observer keeps its precision and its value
            moved = self._buffers[OBSERVER]
            self._buffers[OBSERVER] = observer.to(device=moved.device) if moved.dtype != observer.dtype else moved
        return result

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

    # ------------------------------------------------------------------------------------------ maths
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ForwardAudit.active is not None:
            ForwardAudit.active.ran.add(id(self))
        if not isinstance(self.base_layer, LINEAR_TYPES):  # an adapter was put inside this layer after patching
            check_not_inside_vcon(self)
        observer = self.input_observer
        if observer is not None:
            self._observe(x, observer)
        if self.phase == DENSE:  # f alone
            unused = list(self.compressed_params().values()) if self.training else []
            return keep_in_graph(self.base_layer(x), unused)
        if getattr(self.compressor, "quantizes_inputs", False):
            return self._blend_with_quantized_inputs(x)
        if self.compressor.trains_straight_through:  # β·W + (1−β)·C(W), one matmul, gradient straight through to W
            # On 2-D input: the function's output is then a fresh tensor, and a view of it (the caller's shape) may be
            # written in place, as wav2vec2's masking does; autograd forbids that on a custom function's own views.
            flat = StraightThroughLinear.apply(x.reshape(-1, x.shape[-1]), self.latent_weight(), self.bias,
                                               self.unit_state(), self.compressor, self.blend_weight(),
                                               self.kept_only)
            return flat.view(*x.shape[:-1], flat.shape[-1])
        params = self.compressed_params()
        if self.phase == COMPRESSED:  # g alone, in its cheaper form; W is only touched to keep DDP's reducer whole
            output = self.compressor.compressed_forward(x, params, self.bias)
            return keep_in_graph(output, [self.weight] if self.training else [])
        return self.compressor.blended_forward(x, self.latent_weight(), params, self.bias, self.vcon_beta)

    def _blend_with_quantized_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """β·f(x) + (1−β)·g(x) with g(x) = C·Q(x) + b: a blend of outputs, since Q acts on g's input alone (two
        matmuls while 0 < β < 1, one at β = 0); C(W) and Q(x) both straight-through."""
        latent = self.latent_weight()
        compressed = StraightThroughWeight.apply(latent, self.unit_state(), self.compressor, 0.0, False, False)
        quantized = StraightThroughInputs.apply(x, self.compressor, self.base_layer, self.input_observer)
        output = F.linear(quantized, compressed, self.bias)
        if self.phase == COMPRESSED:
            return output
        return lerp(output, F.linear(x, latent, self.bias), self.vcon_beta)  # β as a device tensor: no sync

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
        return self._repr_method()
