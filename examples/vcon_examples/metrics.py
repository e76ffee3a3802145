"""Metrics from ``evaluate``, with a local implementation of the same metric where the Hub cannot be reached."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

logger = logging.getLogger("vcon_examples")


def _local_metric(name: str, config: Optional[str]) -> Callable[..., dict]:
    """The metrics of ``evaluate.load(name, config)`` for accuracy, mse and the GLUE tasks, computed here."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    def compute(predictions, references) -> dict:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if name == "mse":
            return {"mse": float(np.mean((predictions - references) ** 2))}
        if name == "glue" and config == "stsb":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        if name == "glue" and config == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        result = {"accuracy": float((predictions == references).mean())}
        if name == "glue" and config in ("mrpc", "qqp"):
            result["f1"] = float(f1_score(y_true=references, y_pred=predictions))
        return result

    return compute


_warned_offline = False


def load_metric(name: str, config: Optional[str] = None, cache_dir: Optional[str] = None) -> Callable[..., dict]:
    """``evaluate.load(name, config).compute``; where the Hub cannot be reached, a local implementation of the same
    metric (accuracy, mse, and every GLUE task's), saying so once."""
    global _warned_offline
    try:
        import evaluate

        metric = evaluate.load(name, config, cache_dir=cache_dir)
        return metric.compute
    except Exception as error:  # evaluate raises FileNotFoundError / ConnectionError / OSError offline
        if name not in ("accuracy", "mse", "glue"):
            raise
        if not _warned_offline:
            label = f"{name!r}" + (f", {config!r}" if config else "")
            logger.warning(
                f"evaluate.load({label}) failed ({type(error).__name__}); the Hub is probably unreachable. Using hf_vcon "
                f"examples' local implementation of the same metric."
            )
            _warned_offline = True
        return _local_metric(name, config)
