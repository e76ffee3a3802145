"""``vcon_summary``: what VCON compresses in a model, and how much smaller the targeted layers get."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .compressors import CompressionStats
from .model import get_beta, require_state


@dataclass(frozen=True)
class LayerSummary:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    stats: CompressionStats


@dataclass(frozen=True)
class VConSummary:
    """Sizes of the targeted layers' weights before and after compression (biases are unchanged, not counted).

    ``str(summary)`` is a table; :meth:`to_dict` gives the numbers (for logs and model cards).
    """

    method: str
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
    def settings(self) -> list[str]:
        """The distinct per-layer settings (e.g. ``["rank 16"]``), in first-seen order."""
        return list(dict.fromkeys(layer.stats.setting for layer in self.layers))

    @property
    def size_ratio(self) -> float:
        """bytes after / bytes before, over the targeted layers."""
        return self.bytes_after / max(self.bytes_before, 1)

    def metrics(self) -> dict[str, float]:
        """The compressors' per-layer metrics (sparsity, bits, rank…) averaged over the layers, by parameter count."""
        totals: dict[str, float] = {}
        for layer in self.layers:
            for key, value in layer.stats.metrics.items():
                totals[key] = totals.get(key, 0.0) + value * layer.stats.params_before
        return {key: total / max(self.params_before, 1) for key, total in totals.items()}

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "beta": self.beta,
            "num_layers": len(self.layers),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "settings": self.settings,
            "layers": [{"name": l.name, "shape": list(l.shape), **asdict(l.stats)} for l in self.layers],
        }

    def table(self, per_layer: bool = False) -> str:
        """A Markdown table: one row for the method, or one per layer with ``per_layer=True``."""
        header = "| layers | method | setting | params before → after | bytes before → after | ratio |"
        rule = "|---|---|---|---|---|---|"
        rows = [header, rule]
        groups = [(layer.name, [layer]) for layer in self.layers] if per_layer else [(str(len(self.layers)), list(self.layers))]
        for label, layers in groups:
            before = sum(l.stats.bytes_before for l in layers)
            after = sum(l.stats.bytes_after for l in layers)
            settings = ", ".join(dict.fromkeys(l.stats.setting for l in layers))
            rows.append(
                f"| {label} | {self.method} | {settings} | "
                f"{sum(l.stats.params_before for l in layers):,} → {sum(l.stats.params_after for l in layers):,} | "
                f"{_human_bytes(before)} → {_human_bytes(after)} | {after / before:.4f} |"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def vcon_summary(model: nn.Module) -> VConSummary:
    """Per-method summary of a patched model: layers, params and bytes before → after, sparsity / bits / rank.

    Raises:
        VConError: if the model has no VCON layers.
    """
    state = require_state(model, "vcon_summary")
    layers = tuple(
        LayerSummary(
            name=name,
            shape=(layer.out_features, layer.in_features),
            stats=layer.compressor.stats(layer.latent_weight().detach(), layer.compressed_params()),
        )
        for name, layer in zip(state.targeted_module_names, state.layers)
    )
    return VConSummary(method=state.config.method, beta=get_beta(model), layers=layers)
