"""``VConLinear``: one Linear/Conv1D layer running VCON's blend ``β·f(x) + (1−β)·g(x)``.

For a linear layer the blend of outputs is a blend of weights (the bias is shared):
``β(Wx + b) + (1−β)(Cx + b) = (βW + (1−β)C)x + b``, so the layer runs one matmul with an effective weight,
never two forward passes, and never swaps ``weight.data``.

Cost (see ``benchmarks/overhead.py``): for straight-through compressions (prune, binary) what C needs besides W
(the pruning cut, the scale) is computed once per optimizer step and cached; the effective weight is rebuilt in
backward instead of being kept alive between forward and backward. Once β = 0 a low-rank layer computes only
``B(Ax)``; :func:`hf_vcon.release_dense_paths` then stops the dense W from receiving gradients.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .compressors import Compressor
from .errors import VConError

LinearLike = Union[nn.Linear, Conv1D]


class _StraightThroughLinear(torch.autograd.Function):
    """``F.linear(x, blend(W, state, β), b)`` whose weight gradient reaches W unchanged (STE).

    Only x, W (a parameter: no copy) and the small compression state are saved; the effective weight is rebuilt
    in backward for the input gradient, so no full-size temporary lives from forward to backward.
    """

    @staticmethod
    def forward(ctx, x, latent, bias, state, compressor: Compressor, beta: float):
        ctx.compressor, ctx.beta, ctx.has_bias = compressor, beta, bias is not None
        ctx.state = state  # a cut, mask or scale computed without autograd: neither an input nor an output
        ctx.save_for_backward(x, latent)
        with torch.no_grad():
            weight = compressor.blend(latent, state, beta)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, latent = ctx.saved_tensors
        state = ctx.state
        grad_x = grad_weight = grad_bias = None
        dtype = grad_output.dtype  # under autocast the forward matmul ran in a lower precision
        if ctx.needs_input_grad[0]:
            weight = ctx.compressor.blend(latent, state, ctx.beta).to(dtype)  # (out, in)
            grad_x = (grad_output @ weight).to(x.dtype)
            del weight
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])  # (tokens, out)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_2d.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(latent.dtype)  # (out, in)
            grad_weight = ctx.compressor.weight_gradient(grad_weight, latent, state)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(dim=0).to(latent.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


def _keep_in_graph(output: torch.Tensor, unused: list[torch.Tensor]) -> torch.Tensor:
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

    The original path f is ``base_layer`` with its latent dense weight W; the compressed path g is
    ``compressor.compressed_weight(W, params)``, with any extra trainable tensors of g registered here as
    ``vcon_<name>`` (low-rank: ``vcon_A`` ``(r, in)``, ``vcon_B`` ``(out, r)``). β is set from outside
    (:func:`hf_vcon.set_beta` or the trainer); it is not part of the state dict, since it is a function of the
    optimizer step.

    Args:
        base_layer: the layer to wrap; its parameters are reused, not copied.
        compressor: the compression of g (shared by all layers of one config).
    """

    def __init__(self, base_layer: LinearLike, compressor: Compressor) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"VConLinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.compressor = compressor
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
    @staticmethod
    def orientation(module: LinearLike) -> tuple[int, int]:
        """``(out_features, in_features)`` of a Linear or Conv1D (whose weight is stored ``(in, out)``)."""
        rows, cols = module.weight.shape
        return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)

    @property
    def is_conv1d(self) -> bool:
        return isinstance(self.base_layer, Conv1D)

    @property
    def weight(self) -> nn.Parameter:
        """The latent dense weight W as the base layer stores it (Conv1D: ``(in, out)``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.base_layer.bias

    @property
    def out_features(self) -> int:
        return self.latent_weight().shape[0]

    @property
    def in_features(self) -> int:
        return self.latent_weight().shape[1]

    def latent_weight(self) -> torch.Tensor:
        """W in Linear orientation ``(out, in)``; a transposed view for Conv1D, whose weight is ``(in, out)``."""
        weight = self.base_layer.weight
        return weight.t() if self.is_conv1d else weight

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
        """What C(W) needs besides W (prune: the cut or keep-mask; binary: scale), cached for one optimizer step.

        The cache is keyed on the optimizer step given by :func:`hf_vcon.set_step` and on W's version counter
        (every in-place update of W, as optimizers make, bumps it), so micro-batches of one accumulation window
        and gradient-checkpoint recomputation reuse it. With ``recompute_every=k`` in the config and a step set,
        it is refreshed only every k optimizer steps.
        """
        weight = self.latent_weight()
        every = getattr(self.compressor.config, "recompute_every", 1)
        if every > 1 and self.optimizer_step is not None:
            key: tuple = ("every", self.optimizer_step // every, weight.data_ptr(), id(self.compressor))
        else:
            key = ("version", self.optimizer_step, weight._version, weight.data_ptr(), id(self.compressor))
        if self._state is None or self._state_key != key:
            with torch.no_grad():
                self._state = self.compressor.compression_state(weight.detach(), self._state_memo)
            self._state_key = key
        return self._state

    def compressed_weight(self) -> torch.Tensor:
        """C ``(out, in)``: the weight of g alone (β = 0), without autograd."""
        with torch.no_grad():
            return self.compressor.compressed_weight(self.latent_weight(), self.compressed_params())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.beta == 1.0:  # f alone
            unused = list(self.compressed_params().values()) if self.training else []
            return _keep_in_graph(self.base_layer(x), unused)
        if self.compressor.straight_through:  # β·W + (1−β)·C(W), one matmul, gradient straight through to W
            return _StraightThroughLinear.apply(
                x, self.latent_weight(), self.bias, self.compression_state(), self.compressor, self.beta
            )
        params = self.compressed_params()
        if self.beta == 0.0:  # g alone, in its cheaper form; W is only touched to keep DDP's reducer whole
            output = self.compressor.compressed_forward(x, self.latent_weight(), params, self.bias)
            return _keep_in_graph(output, [self.weight] if self.training else [])
        return self.compressor.blended_forward(x, self.latent_weight(), params, self.bias, self.beta)

    def merged_weight(self) -> torch.Tensor:
        """C in the base layer's own orientation (Conv1D: ``(in, out)``), ready to replace its weight."""
        compressed = self.compressed_weight()
        return compressed.t().contiguous() if self.is_conv1d else compressed

    def extra_repr(self) -> str:
        released = ", dense path released" if self.dense_released else ""
        return f"method={self.compressor.name}, beta={self.beta:.4g}{released}"
