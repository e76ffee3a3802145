"""Naive, independent (numpy) reference implementations of the built-in compressions, for the tests."""

from __future__ import annotations

import numpy as np
import torch


def _keep_largest_rows(scores: np.ndarray, keep: int) -> np.ndarray:
    order = np.argsort(-scores, axis=-1, kind="stable")  # ties: the earlier index first
    mask = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(mask, order[..., :keep], True, axis=-1)
    return mask


REFERENCE_METHODS = ("binary", "lowrank", "prune")


def reference_compressed(weight: torch.Tensor, setting) -> torch.Tensor:
    """C(W) for W ``(out, in)`` built by hand from the method's definition; ``setting`` has ``.method`` and
    ``.options`` (a ``VConConfig`` or a ``LayerSetting``)."""
    w = weight.detach().double().numpy()
    config = setting.options
    if setting.method == "prune":
        pattern, s = config.prune_pattern, config.sparsity
        if pattern == "layer":
            keep = w.size - round(w.size * s)
            mask = _keep_largest_rows(np.abs(w).reshape(1, -1), keep).reshape(w.shape)
        elif pattern == "row":
            mask = _keep_largest_rows(np.abs(w), w.shape[1] - round(w.shape[1] * s))
        else:
            n, m = (int(x) for x in pattern.split(":"))
            mask = _keep_largest_rows(np.abs(w).reshape(w.shape[0], -1, m), n).reshape(w.shape)
        c = w * mask
    elif setting.method == "binary":
        axis = 1 if config.binary_scale == "channel" else None
        c = np.sign(w) * np.abs(w).mean(axis=axis, keepdims=axis is not None)
    elif setting.method == "lowrank":
        rank = config.rank or max(1, round(config.rank_ratio * min(w.shape)))
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        c = (u[:, :rank] * s[:rank]) @ vh[:rank]
    else:
        raise NotImplementedError(setting.method)
    return torch.from_numpy(c).to(weight.dtype)
