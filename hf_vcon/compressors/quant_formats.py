"""The number formats of ``method="quant"`` besides symmetric integers, and compressed-tensors' preset scheme names.

Weights (``format``):

- ``"int"``: symmetric integers, :mod:`.quant`.
- ``"fp8"``: FP8 E4M3 values times one scale per tensor or per output channel (s = max|W| / 448, exact in W's dtype).
- ``"nvfp4"``: FP4 E2M1 values (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6) in groups of 16 inputs, each group with an
  FP8 E4M3 scale s, and one float32 global scale g per tensor: C = e2m1 · s / g. g is compressed-tensors' global scale
  (448 · 6 / max|W|) rounded down to a power of two, so that s / g is exact: the checkpoint then decodes to C bit for
  bit in any dtype and in any order of the products (transformers in bf16, vLLM's kernels).
- ``"mxfp4"``: FP4 E2M1 values in groups of 32, each group with a power-of-two (E8M0) scale.

The scale rules (FP8-rounded group scales, E8M0 exponents, the global scale, the dynamic per-token scales of
activations) are compressed-tensors' own functions, called here; the format definitions of the ``NVFP4A16`` and
``MXFP4A16`` presets are the library's objects. The one re-implemented piece is the rounding to E2M1, since the
library's CPU version assigns through boolean masks (a device synchronisation on a GPU): :func:`round_e2m1` is
arithmetic and the tests check it against the library's ``cast_to_fp4`` value by value.

Activations (``activations``), each the input arguments of one of the library's presets, quantized as a loader of the
checkpoint quantizes a Linear's input:

- ``"int8"`` and ``"fp8"``: dynamic per token (W8A8 and FP8_DYNAMIC), the library's ``compute_dynamic_scales_and_zp``
  and ``fake_quantize``.
- ``"mxfp4"`` (MXFP4): E2M1 values in groups of 32 with dynamic power-of-two scales.
- ``"nvfp4"`` (NVFP4): E2M1 values in groups of 16 with dynamic FP8 group scales under a *static* per-tensor global
  scale, the library's ``generate_gparam`` of the observed max|x| rounded down to a power of two
  (``input_global_scale`` in the checkpoint).
- ``"fp8_static"`` (FP8): FP8 E4M3 values with one *static* per-tensor scale, the library's ``calculate_qparams``
  of the observed max|x| (max|x| / 448, ``input_scale`` in the checkpoint).

The observed max|x| is the layer's running maximum of its inputs (the presets' ``static_minmax`` observer), kept by
the VCON layer (:mod:`hf_vcon.layers.linear`); the functions here turn it into the scales.

The float formats, the activations and the preset names need compressed-tensors (``pip install 'hf_vcon[export]'``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

FORMATS = ("int", "fp8", "nvfp4", "mxfp4")
ACTIVATIONS = ("none", "int8", "fp8", "fp8_static", "nvfp4", "mxfp4")
# The preset whose input arguments each activation setting is.
ACTIVATION_PRESETS = {"int8": "W8A8", "fp8": "FP8_DYNAMIC", "fp8_static": "FP8", "nvfp4": "NVFP4", "mxfp4": "MXFP4"}
# The weight format each activation setting goes with (int8: int; fp8 dynamic: int or fp8).
ACTIVATION_FORMATS = {"int8": ("int",), "fp8": ("int", "fp8"), "fp8_static": ("fp8",), "nvfp4": ("nvfp4",),
                      "mxfp4": ("mxfp4",)}
# Activations with a static per-tensor scale: the layer observes its inputs' max|x|.
OBSERVED_ACTIVATIONS = ("fp8_static", "nvfp4")
FLOAT_FORMATS = ("fp8", "nvfp4", "mxfp4")
FORMAT_BITS = {"fp8": 8, "nvfp4": 4, "mxfp4": 4}
FORMAT_GROUP_SIZE = {"nvfp4": 16, "mxfp4": 32}  # fixed by the formats
FP8_STRATEGIES = ("channel", "tensor")
REQUIREMENT = "compressed-tensors>=0.18,<0.21"


def library():
    """compressed-tensors' quantization module, or a ``ValueError`` naming what to install."""
    try:
        from compressed_tensors import quantization
    except ImportError:
        raise ValueError(f"format, activations and scheme beyond int weights need compressed-tensors: pip install "
                         f"'hf_vcon[export]' (or '{REQUIREMENT}').") from None
    return quantization


# ------------------------------------------------------------------------------------------ preset names
def _presets() -> dict[str, dict]:
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    return PRESET_SCHEMES


def _weights_options(args: Any) -> Optional[dict[str, Any]]:
    """The options of compressed-tensors weight arguments, or None where hf_vcon has no such format."""
    if args is None or not args.symmetric or args.dynamic:
        return None
    strategy = str(getattr(args.strategy, "value", args.strategy))
    kind = str(getattr(args.type, "value", args.type))
    if kind == "int" and strategy in ("tensor", "channel", "group"):
        return {"format": "int", "bits": args.num_bits, "strategy": strategy,
                **({"group_size": args.group_size} if strategy == "group" else {})}
    if kind == "float" and args.num_bits == 8 and strategy in FP8_STRATEGIES:
        return {"format": "fp8", "bits": 8, "strategy": strategy}
    if kind == "float" and args.num_bits == 4 and strategy == "tensor_group" and args.group_size == 16:
        return {"format": "nvfp4", "bits": 4, "strategy": "group", "group_size": 16}
    if kind == "float" and args.num_bits == 4 and strategy == "group" and args.group_size == 32 \
            and args.scale_dtype == torch.uint8:
        return {"format": "mxfp4", "bits": 4, "strategy": "group", "group_size": 32}
    return None


def _activations_option(args: Any) -> Optional[str]:
    """The ``activations`` option of compressed-tensors input arguments, or None where hf_vcon has none: the input
    arguments of one of :data:`ACTIVATION_PRESETS`' presets, and nothing else."""
    if args is None:
        return "none"
    presets = _presets()
    return next((name for name, preset in ACTIVATION_PRESETS.items()
                 if presets.get(preset, {}).get("input_activations") == args), None)


def preset_options(name: str) -> Optional[dict[str, Any]]:
    """The quant options of compressed-tensors preset ``name`` (as the library spells it, any case), or None where
    the preset is one hf_vcon cannot train (asymmetric, blocks, FP6, activations other than those of
    :data:`ACTIVATION_PRESETS`…)."""
    scheme = _presets().get(name.upper())
    if not scheme or set(scheme) - {"weights", "input_activations"}:
        return None
    weights = _weights_options(scheme.get("weights"))
    activations = _activations_option(scheme.get("input_activations"))
    if weights is None or activations is None:
        return None
    return {**weights, "activations": activations}


def accepted_presets() -> tuple[str, ...]:
    return tuple(name for name in _presets() if preset_options(name) is not None)


def check_preset(name: Any) -> dict[str, Any]:
    """The options of preset ``name``; a ``ValueError`` naming the accepted ones otherwise."""
    library()
    if not isinstance(name, str) or name.upper() not in _presets():
        raise ValueError(f"scheme={name!r} is not a compressed-tensors preset; use one of: "
                         f"{', '.join(accepted_presets())}.")
    options = preset_options(name)
    if options is None:
        raise ValueError(f"scheme={name!r} is a compressed-tensors preset that method='quant' cannot train "
                         f"(asymmetric, block or FP6 weights, or activations none of the accepted presets has); use "
                         f"one of: "
                         f"{', '.join(accepted_presets())}.")
    return options


# --------------------------------------------------------------------------------- the library's arguments
def weight_arguments(format: str, bits: int, strategy: str, group_size: Optional[int]) -> Any:
    """compressed-tensors' ``QuantizationArgs`` of the weights: the library's NVFP4A16 / MXFP4A16 preset objects for
    the FP4 formats, the int / FP8 arguments of its presets otherwise."""
    quantization = library()
    if format in FORMAT_GROUP_SIZE:
        preset = "NVFP4A16" if format == "nvfp4" else "MXFP4A16"
        return _presets()[preset]["weights"].model_copy(deep=True)
    return quantization.QuantizationArgs(num_bits=bits, type="int" if format == "int" else "float", symmetric=True,
                                         strategy=strategy, dynamic=False,
                                         group_size=group_size if strategy == "group" else None)


def input_arguments(activations: str) -> Any:
    """compressed-tensors' ``QuantizationArgs`` of the inputs: those of the preset :data:`ACTIVATION_PRESETS` names
    (W8A8, FP8_DYNAMIC, FP8, NVFP4, MXFP4), or None."""
    if activations == "none":
        return None
    library()
    return _presets()[ACTIVATION_PRESETS[activations]]["input_activations"].model_copy(deep=True)


@functools.lru_cache(maxsize=None)
def _cached_weight_arguments(format: str) -> Any:
    return weight_arguments(format, FORMAT_BITS[format], "group", FORMAT_GROUP_SIZE.get(format))


# ------------------------------------------------------------------------------------------------ maths
# |x| above each boundary takes the next E2M1 value; a tie goes to the even code, so the boundaries that round up
# (0.75, 1.75, 3.5) are moved one float below themselves: bucketize puts a value equal to a boundary below it
_E2M1_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_E2M1_TIES_UP = (0.75, 1.75, 3.5)
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@functools.lru_cache(maxsize=None)
def _e2m1_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.tensor(_E2M1_TIES_UP).nextafter(torch.tensor(0.0))
    boundaries = torch.cat([torch.tensor(_E2M1_TIES_DOWN), up]).sort().values
    return boundaries.to(device), torch.tensor(_E2M1_VALUES).to(device)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x (float32, within ±6) rounded to the nearest E2M1 value, ties to the even code, as the library's
    ``cast_to_fp4``: one search among the seven midpoints and a lookup (no boolean masks: no device sync)."""
    boundaries, values = _e2m1_tables(x.device)
    rounded = torch.take(values, torch.bucketize(x.abs().contiguous(), boundaries))  # bucketize copies otherwise
    return rounded.copysign_(x)


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """x (float32, within ±448) rounded to FP8 E4M3, as float32 (the cast the library's quantizer does)."""
    return x.to(torch.float8_e4m3fn).to(torch.float32)


def format_max(format: str) -> float:
    """The largest code of a float format: 448 (E4M3) or 6 (E2M1), from the library."""
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA, FP8_E4M3_DATA
    return float(FP8_E4M3_DATA.max if format == "fp8" else FP4_E2M1_DATA.max)


def round_codes(format: str, scaled: torch.Tensor) -> torch.Tensor:
    """W / s clamped to the format's range and rounded to its grid, float32, in place where it can."""
    limit = format_max(format)
    scaled = scaled.clamp_(-limit, limit)
    return round_fp8(scaled) if format == "fp8" else round_e2m1(scaled)


def global_scale(group_absmax: torch.Tensor) -> torch.Tensor:
    """NVFP4's global scale g (float32) from the group maxima ``(..., out, groups, 1)``, one per leading index (shape
    ``(..., 1, 1, 1)``): compressed-tensors' ``generate_gparam``, 448 · 6 / max|W| (1 where that is not finite),
    rounded down to a power of two. Written out here because the library's returns one value for the whole tensor;
    the tests check it against the library's."""
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA, FP8_E4M3_DATA
    absmax = group_absmax.amax(dim=(-3, -2, -1), keepdim=True).float()
    library_scale = FP8_E4M3_DATA.max * FP4_E2M1_DATA.max / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    library_scale = torch.nan_to_num(library_scale, nan=1.0, posinf=1.0, neginf=1.0)
    return torch.exp2(torch.floor(torch.log2(library_scale)))


def group_scales(format: str, absmax: torch.Tensor, global_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-group scale the library derives from each group's max|W| (float32, the shape of ``absmax``): NVFP4's
    FP8-rounded g · max|W| / 6, MXFP4's power of two; a zero group gets the library's smallest scale."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    scales, _ = calculate_qparams(-absmax, absmax, _cached_weight_arguments(format), global_scale=global_scale)
    return scales.to(torch.float32)


def static_input_tensors(args: Any, observed: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The static tensors a loader reads for inputs of arguments ``args`` (:func:`input_arguments`), from the observed
    max|x| (a 0-d float32 tensor), as the library's ``static_minmax`` observer derives them: FP8's ``input_scale``
    (``calculate_qparams``: max|x| / 448, in the layer's dtype ``dtype``, as the loader holds it) or NVFP4's
    ``input_global_scale`` (``generate_gparam``, 448 · 6 / max|x|, rounded down to a power of two as the weights'
    global scale is: transformers 4.x loads it in the model's dtype, where a power of two stays exact, so every loader
    quantizes with the same value); nothing for dynamic inputs. Device operations only."""
    if args is None or args.dynamic is True:
        return {}
    if not args.dynamic:  # FP8: one static scale
        from compressed_tensors.quantization.utils.helpers import calculate_qparams
        observed = observed.reshape(1)
        scale, _ = calculate_qparams(observed.neg(), observed, args)
        return {"input_scale": scale.to(dtype)}
    if args.strategy == "tensor_group":  # NVFP4: dynamic ("local") group scales under a static global scale
        from compressed_tensors.quantization.utils.helpers import generate_gparam
        observed = observed.reshape(1)
        library_scale = generate_gparam(observed.neg(), observed)
        return {"input_global_scale": torch.exp2(torch.floor(torch.log2(library_scale)))}
    return {}


def quantize_inputs(x: torch.Tensor, args: Any, module: torch.nn.Module,
                    static: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Q(x): the activation quantization a compressed-tensors loader applies to a Linear's input (its
    ``forward_quantize``), with the static tensors of :func:`static_input_tensors` where the inputs have them."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    static = static or {}
    global_scale = static.get("input_global_scale")
    if "input_scale" in static:
        scale, zero_point = static["input_scale"], None
    else:
        scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=module, global_scale=global_scale)
    if args.num_bits == 4:
        return _fake_quantize_fp4(x, scale, args.group_size, global_scale)
    return fake_quantize(x=x, scale=scale, zero_point=zero_point, args=args, global_scale=global_scale)


def _fake_quantize_fp4(x: torch.Tensor, scale: torch.Tensor, group_size: int,
                       global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The library's ``fake_quantize`` of FP4 groups (its ``_process_group`` and ``_quantize_dequantize``, operation
    for operation, so in the same dtypes) with :func:`round_e2m1` for its ``cast_to_fp4``, which syncs on a GPU."""
    groups = x.unflatten(-1, (x.shape[-1] // group_size, group_size))
    scale = scale.unsqueeze(-1)
    if global_scale is not None:
        scale = scale / global_scale
    scaled = groups / scale
    limit = format_max("nvfp4")
    rounded = round_e2m1(scaled.clamp(-limit, limit).float()).to(scaled.dtype)  # exact: E2M1 values in any dtype
    return (rounded.to(scale.dtype) * scale).flatten(start_dim=-2).to(x.dtype)
