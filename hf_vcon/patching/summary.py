"""``vcon_summary``: what VCON compresses in a model, with which setting, and how much smaller the targeted layers get."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..compressors import CompressionStats
from .state import require_state
from .tensors import layer_tensors


@dataclass(frozen=True)
class LayerSummary:
    name: str
    shape: tuple[int, ...]  # (out_features, in_features), or (experts, out_features, in_features)
    method: str
    stats: CompressionStats


@dataclass(frozen=True)
class VConSummary:
    """Sizes of the targeted layers' weights before and after compression (biases are unchanged, not counted).

    ``str(summary)`` is a table, one row per distinct method and setting (``module_overrides`` show as rows of
    their own); :meth:`to_dict` gives the numbers (for logs and model cards).
    """

    method: str  # the config's base method
    beta: float
    layers: tuple[LayerSummary, ...]

    @property
    def params_before(self) -> int:
        return sum(layer.stats.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.stats.params_after for layer in self.layers)

    @property
    def bytes_before(self) -> int:
        return sum(layer.stats.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.stats.bytes_after for layer in self.layers)

    @property
    def methods(self) -> list[str]:
        """The distinct methods of the layers, in first-seen order."""
        return list(dict.fromkeys(layer.method for layer in self.layers))

    @property
    def settings(self) -> list[str]:
        """The distinct per-layer settings (e.g. ``["rank 16"]``; ``"lowrank: rank 16"`` where methods differ)."""
        mixed = len(self.methods) > 1
        return list(dict.fromkeys(f"{l.method}: {l.stats.setting}" if mixed else l.stats.setting for l in self.layers))

    @property
    def size_ratio(self) -> float:
        """bytes after / bytes before, over the targeted layers."""
        return self.bytes_after / max(self.bytes_before, 1)

    def metrics(self) -> dict[str, float]:
        """The compressors' per-layer metrics (sparsity, bits, rank…) averaged by parameter count over the layers
        that report them."""
        totals: dict[str, list[float]] = {}
        for layer in self.layers:
            for key, value in layer.stats.metrics.items():
                total = totals.setdefault(key, [0.0, 0.0])
                total[0] += value * layer.stats.params_before
                total[1] += layer.stats.params_before
        return {key: weighted / max(weight, 1) for key, (weighted, weight) in totals.items()}

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "methods": self.methods,
            "beta": self.beta,
            "num_layers": len(self.layers),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "settings": self.settings,
            "layers": [{"name": l.name, "shape": list(l.shape), "method": l.method, **asdict(l.stats)} for l in self.layers],
        }

    def table(self, per_layer: bool = False) -> str:
        """A Markdown table: one row per method and setting, or one per layer with ``per_layer=True``."""
        rows = ["| layers | method | setting | params before → after | bytes before → after | ratio |",
                "|---|---|---|---|---|---|"]
        groups: dict[tuple, list[LayerSummary]] = {}
        for layer in self.layers:
            key = (layer.name,) if per_layer else (layer.method, layer.stats.setting)
            groups.setdefault(key, []).append(layer)
        for key, layers in groups.items():
            before = sum(l.stats.bytes_before for l in layers)
            after = sum(l.stats.bytes_after for l in layers)
            label = key[0] if per_layer else str(len(layers))
            rows.append(
                f"| {label} | {layers[0].method} | {', '.join(dict.fromkeys(l.stats.setting for l in layers))} | "
                f"{sum(l.stats.params_before for l in layers):,} → {sum(l.stats.params_after for l in layers):,} | "
                f"{human_bytes(before)} → {human_bytes(after)} | {after / max(before, 1):.4f} |"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def human_bytes(count: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def _readable(tensor: torch.Tensor) -> torch.Tensor:
    # A rank that loaded no weights (FSDP cpu_ram_efficient_loading: rank 0 broadcasts them when sharding) holds meta
    # tensors; zeros of the same shape give the same sizes, and its logs are never reported.
    return torch.zeros(tensor.shape, dtype=tensor.dtype) if tensor.is_meta else tensor


def vcon_summary(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> VConSummary:
    """What VCON compresses in a patched model: per layer its method, setting, params and bytes before → after.

    Args:
        model: a model patched by :func:`hf_vcon.apply_vcon` (possibly wrapped).
        state_dict: the model's full state dict, when its modules hold only shards (FSDP, ZeRO-3).

    Raises:
        VConError: if the model has no VCON layers.
    """
    state = require_state(model, "vcon_summary")
    layers = []
    for name, layer, weight, params in layer_tensors(state, state_dict):
        weight, params = _readable(weight), {key: _readable(value) for key, value in params.items()}
        layers.append(LayerSummary(name=name, shape=tuple(weight.shape), method=layer.compressor.name,
                                   stats=layer.stats(weight, params)))
    return VConSummary(method=state.config.method, beta=state.beta, layers=tuple(layers))
