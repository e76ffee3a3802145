"""The merged compressed model as a compressed-tensors checkpoint (``pack-quantized``, or the formats of FP8, NVFP4,
MXFP4 and W8A8 layers: ``float-quantized``, ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``, ``int-quantized``;
``mixed-precision`` when layers differ).

compressed-tensors is the checkpoint format of quantized weights in the Hugging Face stack: plain
``from_pretrained`` loads it (transformers' built-in compressed-tensors quantizer, with the package installed) and
vLLM serves it (its weight-only int kernels cover 4 and 8 bits with channel or group scales). Each layer whose
compression has an integer form (:meth:`~hf_vcon.compressors.Compressor.integer_form`: k-bit quantization, binary
weights as 2-bit ±α) is stored as ``weight_packed`` (int32), ``weight_scale`` (the scales VCON trained with) and
``weight_shape``; every other tensor stays dense, and the Linears that are not quantized are listed in ``ignore``.

The packing is the library's own: the quantization config is applied to a plain copy of the merged model, the
scales set, each weight set to ``codes · scale`` (from which the library derives the same codes) and the model
compressed; ``config.json`` gets the ``quantization_config`` (without a ``sparsity_config`` entry, which vLLM
rejects). Codes are derived in float32 and the scales are exact in the model's dtype, so a bf16 model loads in
bf16 to exactly the merged dense model.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import tempfile
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..compressors import IntegerScheme
from ..errors import VConError, VConWarning
from ..patching.state import VConState
from ..patching.tensors import layer_tensors
from ..utils.linears import is_conv1d

FORMAT_NAME = "compressed-tensors"
EXTRA = "hf_vcon[export]"
REQUIREMENT = "compressed-tensors>=0.18,<0.21"  # 0.18 settled the packing of 3/5/6/7-bit codes; API churns per minor
MINIMUM_VERSION = (0, 18)


# ------------------------------------------------------------------------------------------- checks
def is_available() -> bool:
    """True if the compressed-tensors package can be imported."""
    return importlib.util.find_spec("compressed_tensors") is not None


def require_library() -> None:
    """Raise ``VConError`` naming the extra to install unless a usable compressed-tensors is installed."""
    try:
        import compressed_tensors
    except ImportError as error:
        raise VConError(
            f"Writing the {FORMAT_NAME} format needs the compressed-tensors package: pip install '{EXTRA}' (or "
            f"pip install '{REQUIREMENT}'); or save with export_format='dense'."
        ) from error
    version = tuple(int(part) for part in compressed_tensors.__version__.split(".")[:2] if part.isdigit())
    if version < MINIMUM_VERSION:
        raise VConError(
            f"compressed-tensors {compressed_tensors.__version__} is too old for hf_vcon's {FORMAT_NAME} export "
            f"(its 3/5/6/7-bit packing changed in 0.18): pip install '{REQUIREMENT}'."
        )


def integer_layer_names(state: VConState) -> list[str]:
    """The compressed layers the format stores quantized: an integer form, or compressed-tensors arguments of their
    own (:func:`_arguments`: float formats, quantized activations)."""
    return [name for name, layer, _ in state.named_layers()
            if layer.compressor.integer_scheme() is not None or _arguments(layer.compressor) is not None]


def _arguments(compressor: Any) -> Optional[tuple]:
    """compressed-tensors' (weights, input activations) arguments a compressor defines itself (FP8, NVFP4, MXFP4,
    W8A8), or None: an integer scheme alone (written from its integer form)."""
    arguments = getattr(compressor, "compressed_tensors_arguments", None)
    return None if arguments is None else arguments()


def packed_layer_names(state: VConState) -> list[str]:
    """The integer layers the format stores packed: whole ``nn.Linear`` modules. Fused expert weights and
    ``nn.MultiheadAttention`` projections are no Linear module of their own, so they are written dense (their
    values are the integer codes times the scales all the same)."""
    layers = _layers_by_name(state)
    return [name for name in integer_layer_names(state)
            if isinstance(getattr(layers[name], "base_layer", None), nn.Linear)]


def _layers_by_name(state: VConState) -> dict[str, nn.Module]:
    return dict(zip(state.targeted_module_names, state.layers))


def blockers(model: nn.Module, state: VConState, *, before_training: bool = False) -> list[str]:
    """Why ``model`` cannot be written in the compressed-tensors format (empty if it can). ``before_training``
    leaves out what training itself resolves: input observers that have seen no data yet."""
    names = integer_layer_names(state)
    if not names:
        methods = sorted({setting.method for setting in state.settings})
        return [f"no compressed layer has integer weights (method {', '.join(methods)}); the format stores "
                "quantized layers: method='quant' or 'binary'"]
    layers, problems = _layers_by_name(state), []
    conv1d = [name for name in names if is_conv1d(getattr(layers[name], "base_layer", None))]
    if conv1d:
        problems.append(
            f"{len(conv1d)} quantized layers ({', '.join(conv1d[:3])}{', …' if len(conv1d) > 3 else ''}) are "
            "transformers Conv1D modules (GPT-2 style): compressed-tensors quantizes nn.Linear modules only, and "
            "transformers loads these architectures with Conv1D again, so a quantized layer would load as random "
            "weights")
    unobserved = [] if before_training else _unobserved_layers(state)
    if unobserved:
        problems.append(
            f"{len(unobserved)} layers ({', '.join(unobserved[:3])}{', …' if len(unobserved) > 3 else ''}) quantize "
            "their inputs with a static scale (FP8, NVFP4) but have observed no input yet, so the checkpoint would "
            "have no input scale; run the model on data first (any training forward, or one forward in evaluation "
            "mode)")
    head = _tied_output_head(model)
    if head is not None and head in names:
        problems.append(f"the output head {head!r} is quantized but tied to the input embeddings, which "
                        "compressed-tensors cannot load; leave it out (exclude_modules)")
    return problems


def _unobserved_layers(state: VConState) -> list[str]:
    """The layers with an input observer (:class:`~hf_vcon.layers.linear.VConLinear`) still at 0."""
    return [name for name, layer, _ in state.named_layers()
            if getattr(layer, "input_observer", None) is not None and not bool(layer.input_observer > 0)]


def _tied_output_head(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None else None


# -------------------------------------------------------------------------------------------- write
def save_compressed_tensors(model: nn.Module, state: VConState, output_dir: str, source: dict[str, torch.Tensor],
                            merged: dict[str, torch.Tensor], **save_kwargs: Any) -> None:
    """Write ``model`` (patched, unwrapped) merged at β = 0 to ``output_dir`` in the compressed-tensors format.

    ``source`` is the patched model's full state dict and ``merged`` its merged form
    (:func:`hf_vcon.merged_state_dict`).

    Raises:
        VConError: if compressed-tensors is missing, or the model cannot be written in this format
            (:func:`blockers`); checked before anything is written.
    """
    problems = blockers(model, state)
    if problems:
        raise VConError(f"Cannot write the {FORMAT_NAME} format: {'; '.join(problems)}. Save with export_format='dense'.")
    require_library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    plain = _plain_model(model, merged)
    layers = _layers_by_name(state)
    schemes = {name: layers[name].compressor.integer_scheme() for name in packed_layer_names(state)}
    dense = sorted(set(integer_layer_names(state)) - set(schemes))
    if dense:
        warnings.warn(f"{len(dense)} quantized weights ({', '.join(dense[:3])}{', …' if len(dense) > 3 else ''}) are "
                      "no nn.Linear module of their own (fused experts, MultiheadAttention): they are written dense "
                      "in the compressed-tensors checkpoint, with their quantized values.", VConWarning, stacklevel=4)
    arguments = {name: _arguments(layers[name].compressor) for name in schemes}
    arguments = {name: value for name, value in arguments.items() if value is not None}
    config = _quantization_config(plain, schemes, arguments)
    apply_quantization_config(plain, config)
    _write_integer_weights(plain, state, source, schemes)
    # pack-quantized for integer weights alone; else each group's format as the library infers it (mixed-precision
    # when they differ)
    compressor = ModelCompressor.from_pretrained_model(plain, quantization_format=None if arguments else "pack-quantized")
    # The library infers ``ignore`` from the exact classes it quantized (FalconLinear), but the loader matches the
    # ``Linear`` target through subclasses: an untargeted nn.Linear it left out would load as packed random weights.
    compressor.quantization_config.ignore = _checkpoint_names(plain, config.ignore)
    with one_process():
        compressor.compress_model(plain)
    _to_original_dtypes(plain, merged)
    plain.config.quantization_config = _quantization_config_entry(compressor)
    save_kwargs = {**_layout_kwargs(plain, merged), **save_kwargs}
    plain.save_pretrained(output_dir, **save_kwargs)  # config.json written once, with its quantization_config


def architecture_class(model: nn.Module) -> type:
    """The model's architecture class (FSDP2 swaps the model's class for an ``FSDP<name>`` subclass)."""
    return next(cls for cls in type(model).__mro__ if not cls.__name__.startswith("FSDP"))


def _plain_model(model: nn.Module, merged: dict[str, torch.Tensor]) -> nn.Module:
    """A float32 instance of the base architecture on the CPU holding the merged weights."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        plain = architecture_class(model)(copy.deepcopy(model.config))
    plain = plain.to(device="cpu", dtype=torch.float32)
    try:
        plain.load_state_dict(merged, strict=True)
    except RuntimeError as error:
        raise VConError(f"The merged state dict does not fit a fresh {type(model).__name__}: {error}") from None
    return plain.eval()


def _quantization_config(plain: nn.Module, schemes: dict[str, IntegerScheme], arguments: Optional[dict] = None) -> Any:
    """One config group per scheme (``targets: ["Linear"]`` when there is one), the other Linears ignored.
    ``arguments``: the (weights, inputs) arguments of the layers that define their own."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    arguments = arguments or {}
    by_scheme: dict[str, tuple[Any, Any, list[str]]] = {}
    for name, scheme in schemes.items():
        weights, inputs = arguments.get(name) or (
            QuantizationArgs(num_bits=scheme.num_bits, type="int", symmetric=True, strategy=scheme.strategy,
                             group_size=scheme.group_size), None)
        key = weights.model_dump_json() + (inputs.model_dump_json() if inputs is not None else "")
        by_scheme.setdefault(key, (weights, inputs, []))[2].append(name)
    groups = {}
    for index, (weights, inputs, names) in enumerate(by_scheme.values()):
        targets = ["Linear"] if len(by_scheme) == 1 else names
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)
    ignore = [name for name, module in plain.named_modules() if _is_linear_target(module) and name not in schemes]
    return QuantizationConfig(config_groups=groups, ignore=ignore)


def _is_linear_target(module: nn.Module) -> bool:
    """Whether the loader's ``"Linear"`` target matches ``module``: some class of its MRO is named ``Linear``
    (nn.Linear and its subclasses: FalconLinear, NonDynamicallyQuantizableLinear…)."""
    return any(cls.__name__ in ("Linear", "LinearBase") for cls in type(module).__mro__)


def _checkpoint_names(plain: nn.Module, names: list[str]) -> list[str]:
    """``names`` as the checkpoint spells them where transformers 5 renames weight keys on saving, as the library
    maps its own ignore list."""
    try:
        from compressed_tensors.quantization.quant_config import _map_to_checkpoint_names
    except ImportError:  # versions without key renaming
        return list(names)
    return _map_to_checkpoint_names(plain, list(names))


def _write_integer_weights(plain: nn.Module, state: VConState, source: dict, schemes: dict[str, IntegerScheme]) -> None:
    """Set each quantized module's scale to VCON's and its weight to codes · scale (float32, exact)."""
    with torch.no_grad():
        for name, layer, weight, params in layer_tensors(state, source):
            if name not in schemes:
                continue
            module = plain.get_submodule(name)
            if getattr(module, "quantization_scheme", None) is None or not hasattr(module, "weight_scale"):
                raise VConError(f"compressed-tensors did not attach a quantization scheme to {name!r}.")
            _write_static_inputs(module, layer, weight.dtype)
            if getattr(layer.compressor, "is_float", False):
                _write_float_weight(module, layer.compressor, weight, params)
                continue
            form = layer.compressor.integer_form(weight, params)
            module.weight_scale.copy_(form.scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.zero_()
            # The library derives the codes again as clamp(round(W / s)): from W = codes · s they come out unchanged.
            module.weight.copy_(form.codes.to(torch.float32) * form.expanded_scale())


def _write_static_inputs(module: nn.Module, layer: nn.Module, dtype: torch.dtype) -> None:
    """A layer with an input observer: the static input tensors (``input_scale``, ``input_global_scale``) the
    library's rule derives from its observed max|x|, the values VCON's Q(x) used, written where the loader reads
    them."""
    observer = getattr(layer, "input_observer", None)
    if observer is None:
        return
    for key, value in layer.compressor.static_input_tensors(observer.detach().cpu(), dtype).items():
        target = getattr(module, key, None)
        if target is None:
            raise VConError(f"compressed-tensors did not give {module.__class__.__name__} a {key!r} to write.")
        target.copy_(value.reshape(target.shape).to(target.dtype))


def _write_float_weight(module: nn.Module, compressor: Any, weight: torch.Tensor, params: dict) -> None:
    """Set a float-format module's scales (and NVFP4's global scale) to VCON's and its weight to C (float32): the
    library's quantizer derives the same FP8 / E2M1 codes from them (C / s is exactly a code)."""
    for key, value in compressor.float_form(weight).items():
        getattr(module, key).copy_(value.reshape(getattr(module, key).shape))
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.zero_()
    module.weight.copy_(compressor.compressed_weight(weight, params).to(torch.float32))


@contextlib.contextmanager
def one_process():
    """compressed-tensors compresses, unpacks and offloads across ranks when torch.distributed is initialised, but
    only the saving process exports here (the others would never join); keep it to this process."""
    from compressed_tensors.compressors.model_compressors import model_compressor

    with contextlib.ExitStack() as stack:
        try:  # 0.20: the library's own switch (offload caches, unpacking on load)
            from compressed_tensors.offload.utils import as_single_threaded
            stack.enter_context(as_single_threaded())
        except ImportError:
            pass
        original = getattr(model_compressor, "is_distributed", None)
        if original is not None:
            model_compressor.is_distributed = lambda: False
            stack.callback(setattr, model_compressor, "is_distributed", original)
        yield


def _layout_kwargs(plain: nn.Module, merged: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``save_original_format=False`` where transformers 5 would write the weights back in an older layout (fused MoE
    experts split into per-expert ``w1``/``w2``/``w3``): it cannot load a compressed-tensors checkpoint in that layout
    (its conversion on load finds no tensors to concatenate), while the model's own layout loads exactly."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x saves the model's own layout
        return {}
    reverted = revert_weight_conversion(plain, dict(merged))
    return {} if set(reverted) == set(merged) else {"save_original_format": False}


def _to_original_dtypes(plain: nn.Module, merged: dict[str, torch.Tensor]) -> None:
    """Dense tensors back in the model's dtypes and each scale in its layer's (exact by construction), in place."""
    for key, tensor in [*plain.named_parameters(), *plain.named_buffers()]:
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            continue  # codes and scales in the format's own type (FP8 weights, NVFP4's FP8 scales, E8M0 exponents)
        if key.endswith(".weight_scale"):
            dtype = merged[key[: -len("_scale")]].dtype
        elif key in merged and tensor.is_floating_point():
            dtype = merged[key].dtype
        else:
            continue
        if tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def _quantization_config_entry(compressor: Any) -> dict:
    """``config.json``'s ``quantization_config`` as the library writes it (``update_config``), without the
    ``sparsity_config`` entry that vLLM ≥ 0.24 refuses."""
    with tempfile.TemporaryDirectory() as folder:
        compressor.update_config(folder)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            entry = json.load(handle)["quantization_config"]
    entry.pop("sparsity_config", None)
    return entry
