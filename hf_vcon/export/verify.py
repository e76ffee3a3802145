"""Check that a written checkpoint loads back, with plain transformers, to the merged model.

A format is only worth claiming if ``from_pretrained`` loads it: some model classes' own weight initialisation reads
``.weight`` of every Linear and crashes on the packed modules of a compressed-tensors checkpoint (seen with
transformers 5.x on Falcon, SigLIP, ModernBERT, T5, wav2vec2, GPTBigCode), and a module the loader quantizes but the
checkpoint stores dense would load as random weights. :func:`load_problem` loads the folder as a user would (the
model's own class, its dtype, no hf_vcon involved), unpacks the quantized modules in memory and compares every tensor
with the merged state dict: equal weights give equal logits on every input.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
import transformers
from torch import nn

_DTYPE_KEY = "dtype" if tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"


def load_problem(model_class: type, folder: str, merged: dict[str, torch.Tensor]) -> Optional[str]:
    """Why plain ``model_class.from_pretrained(folder)`` does not give back ``merged`` (``None`` when it does).

    The folder is loaded on the CPU in the dtype of ``merged``'s floating tensors, unpacked as its first forward
    unpacks it and each tensor of ``merged`` compared with the loaded one, within one unit in the last place of its
    dtype (the unpacked codes · scales are exact in float32). The check holds the merged model's size once more.
    """
    dtype = next((tensor.dtype for tensor in merged.values() if tensor.is_floating_point()), torch.float32)
    try:
        with _one_process():
            loaded = model_class.from_pretrained(folder, **{_DTYPE_KEY: dtype})
    except Exception as error:  # any failure of transformers' loader means the folder does not load
        return f"transformers cannot load it ({type(error).__name__}: {_first_line(error)})"
    try:
        return _mismatch(loaded, merged)
    except Exception as error:
        return f"its quantized weights cannot be unpacked after loading ({type(error).__name__}: {_first_line(error)})"


def _one_process() -> ContextManager:
    """Load as one process even inside a distributed run: only the main process saves and checks, and
    compressed-tensors (0.20+) would otherwise share the decompression across ranks with collectives the other ranks
    never join (a hang)."""
    try:
        from compressed_tensors.offload import as_single_threaded
    except ImportError:  # releases without distributed loading
        return contextlib.nullcontext()
    return as_single_threaded()


def _mismatch(loaded: nn.Module, merged: dict[str, torch.Tensor]) -> Optional[str]:
    """Unpack ``loaded`` as its first forward would (compressed-tensors' ``decompress_model``, which also fails where
    that forward would) and compare it with ``merged`` tensor by tensor."""
    _unpack(loaded)
    actual = loaded.state_dict()
    missing = [key for key in merged if key not in actual]
    if missing:
        return f"the loaded model has no {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
    decoded = [key for key, tensor in merged.items()
               if tensor.is_floating_point() and actual[key].is_floating_point() and actual[key].dtype != tensor.dtype]
    if decoded:  # compressed-tensors decodes FP4 in bfloat16 whatever the model's dtype: a float32 forward fails
        return (f"its weights decode to {actual[decoded[0]].dtype} ({', '.join(decoded[:3])}"
                f"{' …' if len(decoded) > 3 else ''}), not the model's {merged[decoded[0]].dtype}, so the loaded "
                "model's forward fails; save the model in that dtype")
    different = [key for key, tensor in merged.items() if not _close(actual[key], tensor)]
    if different:
        return (f"the loaded model's {', '.join(different[:3])}{' …' if len(different) > 3 else ''} differ from the "
                "merged model's (the loader built them from something else than what was written)")
    return None


def _unpack(loaded: nn.Module) -> None:
    compressor = getattr(getattr(loaded, "hf_quantizer", None), "compressor", None)
    if compressor is not None:
        compressor.decompress_model(loaded)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    if actual.shape != expected.shape:
        return False
    if not expected.is_floating_point():
        return torch.equal(actual.cpu().to(expected.dtype), expected.cpu())
    unit = 1e-6 if expected.dtype == torch.float32 or expected.dtype == torch.float64 else torch.finfo(expected.dtype).eps
    expected = expected.detach().float().cpu()
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    return bool(torch.allclose(actual.detach().float().cpu(), expected, rtol=0, atol=unit * scale))


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""
