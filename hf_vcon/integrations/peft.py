"""VCON with PEFT adapters: compress a (frozen) base smoothly while LoRA adapters learn to compensate.

The supported recipe puts VCON first and the adapters on top (QLoRA / LoftQ-style): ``apply_vcon(model, config)``,
then :func:`get_peft_model` (this module's; PEFT's own refuses VCON layers). A LoRA adapter on a VCON layer then wraps
the whole VCON layer, so its update is added to the blend at every β: ``y = (β·W + (1−β)·C)·x + b + s·B_l·A_l·x``.
Adapters on other modules work as usual. PEFT first and VCON after works too, for targets that are not adapter layers
or inside one. Saving (:func:`hf_vcon.save_merged`, ``VConTrainer.save_model()``) writes the compressed base model
without the adapters, and the adapters in ``adapter/`` beside it; an adapter's update is not merged into a compressed
layer, where C(W) + ΔW would no longer be compressed.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ..errors import VConError
from ..layers.linear import VConLinear


@functools.lru_cache(maxsize=None)
def vcon_lora_class() -> type:
    """PEFT's LoRA ``Linear`` over a :class:`~hf_vcon.layers.linear.VConLinear`: its forward is the VCON blend plus the
    adapter's update; PEFT's unloading stops at the VCON layer (it stays), and merging into it is refused."""
    import inspect

    from peft.tuners.lora import Linear as LoraLinear

    takes_config = "config" in inspect.signature(LoraLinear.__init__).parameters  # PEFT >= 0.18

    class VConLoraLinear(LoraLinear):
        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any = None, **kwargs: Any) -> None:
            if kwargs.get("use_dora"):
                raise VConError("use_dora=True normalises by the base layer's weight, which a VCON layer blends; "
                                "use plain LoRA on VCON layers.")
            if base_layer.compressor.changes_shapes:
                raise VConError(
                    f"method={base_layer.compressor.name!r} removes rows or columns of this layer when merged, while "
                    "a LoRA adapter on it keeps the full size: put the adapters on layers the compression does not "
                    "resize (target_modules of the LoraConfig), or compress without them.")
            if takes_config:
                kwargs["config"] = config
            super().__init__(base_layer, adapter_name, **kwargs)

        def get_base_layer(self) -> nn.Module:
            base = self.base_layer
            while not isinstance(base, VConLinear) and hasattr(base, "base_layer"):
                base = base.base_layer
            return base

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise VConError(
                "An adapter on a VCON layer cannot be merged into it: C(W) + ΔW would not be compressed, and folding "
                "ΔW into the latent W would compress another weight than the one trained. Save the compressed base "
                "and the adapter apart with hf_vcon.save_merged(model, folder) (the adapter goes to folder/adapter)."
            )

    return VConLoraLinear


def get_peft_model(model: nn.Module, peft_config: Any, **kwargs: Any) -> nn.Module:
    """``peft.get_peft_model`` that can put LoRA adapters on VCON layers (name them as usual: ``"query"``).

    Args:
        model: a model patched by :func:`hf_vcon.apply_vcon`.
        peft_config: a ``peft.LoraConfig``.
        kwargs: passed to ``peft.get_peft_model``.

    Raises:
        VConError: for another PEFT method than LoRA, or LoRA targets inside a VCON layer (``"query.base_layer"``).
    """
    import peft

    if not isinstance(peft_config, peft.LoraConfig):
        raise VConError(f"hf_vcon.get_peft_model puts LoRA adapters on VCON layers; {type(peft_config).__name__} is "
                        "not supported there (use peft.get_peft_model for adapters on other modules).")
    peft_config._register_custom_module({VConLinear: vcon_lora_class()})
    return peft.get_peft_model(model, peft_config, **kwargs)
