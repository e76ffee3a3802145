"""``VConWeight``: VCON on a weight that model code reads directly instead of calling a Linear.

Some modules never call the Linear whose weight they use: ``nn.MultiheadAttention`` passes ``out_proj.weight`` (and
its own ``in_proj_weight``) to ``F.multi_head_attention_forward``; WavLM's attention does the same with its q/k/v
projections; transformers 5's mixture-of-experts modules hold every expert's weights in one 3-D parameter
``(experts, out, in)`` and index it. A wrapper that only overrides ``forward`` would be bypassed there (a silent wrong
result). ``VConWeight`` is a torch parametrization of that parameter instead: reading ``owner.<name>`` gives
``β·W + (1−β)·C``, computed once per forward of the owner, with the gradient reaching the latent W straight-through
(compressions recomputed from W) or through the compression's own tensors (low-rank). A 3-D expert weight is
compressed expert by expert: each expert gets its own mask, scale or factors.

The latent weight lives at ``owner.parametrizations.<name>.original``, the compression's tensors at
``owner.parametrizations.<name>.0.vcon_<key>`` (stacked over experts). Merging writes C back into a plain parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..compressors import Compressor
from .protocol import COMPRESSED, DENSE, StraightThroughWeight, VConUnit, keep_in_graph


class VConWeight(VConUnit):
    """VCON on ``owner.<param_name>``, a 2-D weight ``(out, in)`` or a 3-D expert weight ``(experts, out, in)``
    (``transposed``: stored ``(…, in, out)``), as a parametrization of it.

    It holds β like :class:`~hf_vcon.layers.linear.VConLinear` and offers the same views (``latent_weight``,
    ``compressed_params``, ``compressed_weight``), with a leading expert dimension for 3-D weights.

    Args:
        owner: the module holding the parameter (not replaced; it gets the parametrization).
        param_name: the parameter's name on ``owner``.
        compressor: the compression of every slice.
        transposed: the parameter stores ``(…, in, out)``.
        recompute_every: refresh the compression state every this many optimizer steps.
    """

    def __init__(self, owner: nn.Module, param_name: str, compressor: Compressor, *, transposed: bool = False,
                 recompute_every: int = 1) -> None:
        super().__init__(compressor, recompute_every=recompute_every)
        object.__setattr__(self, "owner", owner)  # not a submodule: the owner holds this module, not the reverse
        self.param_name, self.transposed = param_name, transposed
        parameter = getattr(owner, param_name)
        self.stacked = parameter.dim() == 3
        self._register_compressed_params(self._linear(parameter), trainable=parameter.requires_grad)
        self._hooks: list = []

    # ------------------------------------------------------------------------------------------- views
    def _linear(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.transpose(-1, -2) if self.transposed else stored

    def _stored(self, linear: torch.Tensor) -> torch.Tensor:
        return linear.transpose(-1, -2) if self.transposed else linear

    @property
    def weight(self) -> nn.Parameter:
        """The latent dense weight, as the owner stores it."""
        return self.owner.parametrizations[self.param_name].original

    @property
    def bias(self) -> None:
        return None

    @property
    def out_features(self) -> int:
        return self.latent_weight().shape[-2]

    @property
    def in_features(self) -> int:
        return self.latent_weight().shape[-1]

    def latent_weight(self) -> torch.Tensor:
        """W in Linear orientation, ``(out, in)`` or ``(experts, out, in)``."""
        return self._linear(self.weight)

    # ------------------------------------------------------------------------------------------ maths
    def forward(self, original: torch.Tensor) -> torch.Tensor:
        latent = self._linear(original)
        params = self.compressed_params()
        if self.phase == DENSE:
            return keep_in_graph(original, list(params.values())) if self.training else original
        if self.compressor.trains_straight_through:
            blended = StraightThroughWeight.apply(latent, self.unit_state(latent), self.compressor, self.blend_weight(),
                                                  self.kept_only, not self.whole_state)
            return self._stored(blended)
        compressed = self._stack([self.compressor.compose(self.slice_params(index, params))
                                  for index in range(self.num_slices)])
        if self.phase == COMPRESSED:
            return self._stored(keep_in_graph(compressed, [original]) if self.training else compressed)
        # under autocast C is 16-bit: blended in its dtype, as the matmul that reads the weight runs
        return self._stored(torch.lerp(compressed, latent.to(compressed.dtype), self.vcon_beta))

    # ---------------------------------------------------------------- the unit's tensors, for the exports
    def owner_name(self, name: str) -> str:
        """The owner's module name, from the unit's name (the owner's own name, or ``<owner>.<param_name>``)."""
        suffix = f".{self.param_name}"
        return name[: -len(suffix)] if name.endswith(suffix) else name

    def state_keys(self, name: str) -> tuple[str, dict[str, str]]:
        prefix = f"{self.owner_name(name)}.parametrizations.{self.param_name}"
        return f"{prefix}.original", {key: f"{prefix}.0.vcon_{key}" for key in self.compressed_params()}

    def replaced_keys(self, name: str) -> tuple[set[str], dict[str, str]]:
        latent, params = self.state_keys(name)
        return {latent, *params.values()}, {}

    def merged_key(self, name: str) -> str:
        return f"{self.owner_name(name)}.{self.param_name}"

    def merged_tensors(self) -> tuple[torch.Tensor, None]:
        """The merged weight (C, in Linear orientation) and no bias: a parametrized weight keeps its shape."""
        return self.compressed_weight(), None

    def merged_state(self, name: str, weight: torch.Tensor, params: dict[str, torch.Tensor], merged: dict,
                     coupled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The merged model's tensor of this weight: C, in the owner's orientation."""
        return {self.merged_key(name): self.stored(self.compress(weight, params))}

    def describe(self) -> dict:
        """What the compact format records to rebuild this weight (per slice: ``shape`` is ``[out, in]``)."""
        return {"kind": "weight", "param": self.param_name, "experts": self.num_slices if self.stacked else None,
                "transposed": self.transposed, "shape": [self.out_features, self.in_features]}

    def oriented(self, stored: torch.Tensor) -> torch.Tensor:
        return self._linear(stored)

    def stored(self, weight: torch.Tensor) -> torch.Tensor:
        return self._stored(weight).contiguous()

    # -------------------------------------------------------------------------------------- lifecycle
    def fetched_with(self) -> nn.Module:
        """The owner: its forward reads the parametrized weight, so W and this unit's tensors are fetched with it."""
        return self.owner

    def attach_to(self, model: nn.Module, name: str) -> None:
        """Parametrize the owner's parameter, cached over each forward of the owner (indexing it per expert reads
        it many times)."""
        parametrize.register_parametrization(self.owner, self.param_name, self, unsafe=True)
        self._hooks = [self.owner.register_forward_pre_hook(_enter_cache),
                       self.owner.register_forward_hook(_exit_cache, always_call=True)]

    def detach_from(self, model: nn.Module, name: str, merge: bool) -> None:
        """Remove the parametrization: the parameter holds C (``merge``) or the latent W again."""
        for hook in self._hooks:
            hook.remove()
        latent = self.weight
        trainable = any(param.requires_grad for param in self.parameters()) or latent.requires_grad
        if merge:
            with torch.no_grad():
                latent.copy_(self._stored(self.compressed_weight()))
            latent.requires_grad_(trainable)
        _remove_parametrization(self.owner, self.param_name, latent)

    def extra_repr(self) -> str:
        experts = f", experts={self.weight.shape[0]}" if self.stacked else ""
        return f"{self.param_name}, {self._repr_method()}{experts}"


def _remove_parametrization(owner: nn.Module, name: str, value: nn.Parameter) -> None:
    """Make ``owner.<name>`` the plain parameter ``value`` again.

    ``torch.nn.utils.parametrize.remove_parametrizations`` deletes the property from the module's parametrized class,
    which a deep copy of the module shares: it would break the other copy. This gives the module a class of its own.
    """
    del owner.parametrizations[name]
    parametrized_class = owner.__class__
    remaining = list(owner.parametrizations.keys())
    if remaining:  # other parametrizations (weight norm…) keep their properties, on a class of this module's own
        namespace = {key: value for key, value in parametrized_class.__dict__.items()
                     if key not in ("__dict__", "__weakref__", name)}
        owner.__class__ = type(parametrized_class.__name__, parametrized_class.__bases__, namespace)
    else:
        delattr(owner, "parametrizations")
        owner.__class__ = parametrized_class.__bases__[0]
    owner.register_parameter(name, value)


_CACHE_DEPTH: list[Any] = []


def _enter_cache(module: nn.Module, args: Any) -> None:
    context = parametrize.cached()
    context.__enter__()
    _CACHE_DEPTH.append(context)


def _exit_cache(module: nn.Module, args: Any, output: Any) -> None:
    if _CACHE_DEPTH:
        _CACHE_DEPTH.pop().__exit__(None, None, None)
