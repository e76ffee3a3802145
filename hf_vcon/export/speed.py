"""How much faster a model gets when its compression makes it smaller (structured pruning): the merged architecture
timed against the dense one in the same process, on the model's device and dtype, as the model card reports it.

The dense model is the patched model itself at β = 1, which runs exactly the dense layers (no second copy); the
smaller one is built from the merged model's config (random weights: a forward pass takes as long whatever the
values). Forwards alternate between the two, so that a machine's load affects both alike; the median is reported.
``benchmarks/structured_speed.py`` measures the same at BERT-base and Llama shapes over several sparsities.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..compressors.structured.couplings import resized_config
from ..errors import VConError
from ..patching.state import require_state
from ..patching.tensors import config_changes
from ..utils.modules import unwrap_model

DEFAULT_TOKENS = 128


@dataclass(frozen=True)
class Speedup:
    """Median forward latency of the dense and of the merged (smaller) model, and what was timed."""

    dense_ms: float
    compressed_ms: float
    inputs: str
    dtype: str
    device: str

    @property
    def ratio(self) -> float:
        """dense / smaller latency: 2.0 means twice as fast."""
        return self.dense_ms / self.compressed_ms

    def __str__(self) -> str:
        return (f"{self.ratio:.2f}× ({self.dense_ms:.2f} ms → {self.compressed_ms:.2f} ms per forward; {self.inputs}, "
                f"{self.dtype}, {self.device})")


def example_inputs(model: nn.Module, tokens: int = DEFAULT_TOKENS) -> Optional[dict[str, torch.Tensor]]:
    """One input of the model's main kind: ``tokens`` token ids (at most its positions) or one image at its
    ``image_size``; ``None`` for other inputs (audio…)."""
    config, name = model.config, getattr(model, "main_input_name", "input_ids")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    if name == "input_ids" and getattr(config, "vocab_size", None):
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or tokens
        length = min(tokens, positions)
        return {name: torch.randint(0, config.vocab_size, (1, length), generator=generator).to(device)}
    if name == "pixel_values" and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, int) else tuple(config.image_size)[0]
        dtype = next(model.parameters()).dtype
        image = torch.randn(1, getattr(config, "num_channels", 3), size, size, generator=generator)
        return {name: image.to(device=device, dtype=dtype)}
    return None


def _describe(inputs: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{key} {tuple(value.shape)}" for key, value in inputs.items())


def _timed(model: nn.Module, inputs: dict, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model(**inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def measure_speedup(model: nn.Module, inputs: Optional[dict[str, torch.Tensor]] = None, repeats: int = 15,
                    warmup: int = 2) -> Optional[Speedup]:
    """Time the dense model against the smaller merged one (see the module docstring); the model is left as it was
    (its β, training mode and weights).

    Args:
        model: a model patched by :func:`hf_vcon.apply_vcon` with a compression that changes its shapes.
        inputs: the model's keyword inputs; default :func:`example_inputs` (one sequence of 128 tokens, one image).
        repeats: timed forwards of each model, alternating.
        warmup: untimed forwards of each first.

    Returns:
        The :class:`Speedup`, or ``None`` when no inputs are given and none can be made for this model.

    Raises:
        VConError: if the compression keeps the model's shapes (nothing to compare), or the model is not patched.
    """
    inner = unwrap_model(model)
    state = require_state(inner, "measure_speedup")
    changes = config_changes(state)
    if not changes:
        raise VConError("measure_speedup compares the dense model with a smaller merged one, but this model's "
                        "compression keeps its shapes.")
    inputs = inputs if inputs is not None else example_inputs(inner)
    if inputs is None:
        return None
    first = next(inner.parameters())
    smaller = type(inner)._from_config(resized_config(inner.config, changes), dtype=first.dtype)
    smaller = smaller.to(first.device).eval()
    betas, training = [holder.beta for holder in state.holders], inner.training
    dense, compressed = [], []
    try:
        for holder in state.holders:
            holder.set_beta(1.0)
        inner.eval()
        with torch.no_grad():
            for step in range(warmup + repeats):
                dense_ms, compressed_ms = _timed(inner, inputs, first.device), _timed(smaller, inputs, first.device)
                if step >= warmup:
                    dense.append(dense_ms)
                    compressed.append(compressed_ms)
    finally:
        for holder, beta in zip(state.holders, betas):
            holder.set_beta(beta)
        inner.train(training)
    return Speedup(statistics.median(dense), statistics.median(compressed), _describe(inputs),
                   str(first.dtype).removeprefix("torch."), str(first.device))
