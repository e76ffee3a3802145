"""Naive, independent (numpy) reference implementations of the built-in compressions, for the tests."""

from __future__ import annotations

import numpy as np
import torch


def _keep_largest_rows(scores: np.ndarray, keep: int) -> np.ndarray:
    order = np.argsort(-scores, axis=-1, kind="stable")  # ties: the earlier index first
    mask = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(mask, order[..., :keep], True, axis=-1)
    return mask


REFERENCE_METHODS = ("binary", "lowrank", "prune", "quant")


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
    elif setting.method == "quant":
        return torch.from_numpy(_quantized(weight.detach().float().numpy(), config)).to(weight.dtype)
    else:
        raise NotImplementedError(setting.method)
    return torch.from_numpy(c).to(weight.dtype)


def _quantized(w: np.ndarray, config) -> np.ndarray:
    """s·clip(round(W/s), −2^(b−1), 2^(b−1)−1) in float32, s = max|W|/(2^(b−1)−1) per block, or the clip ratio in
    1, 0.95, …, 0.5 of it with the least squared error."""
    qmax, qmin = 2 ** (config.bits - 1) - 1, -(2 ** (config.bits - 1))
    rows, cols = w.shape
    shape = {"tensor": (1, 1, rows * cols), "channel": (rows, 1, cols)}.get(
        config.strategy, (rows, cols // config.group_size, config.group_size))
    blocks = w.reshape(shape).astype(np.float32)
    absmax = np.abs(blocks).max(axis=-1, keepdims=True)
    ratios = [1.0 - 0.05 * k for k in range(11)] if config.clip_search else [1.0]
    best, best_error = None, None
    for ratio in ratios:
        scale = (absmax * np.float32(ratio / qmax)).astype(np.float32)
        scale[scale == 0] = 1.0
        c = np.clip(np.round(blocks / scale), qmin, qmax) * scale
        error = ((c - blocks) ** 2).sum(axis=-1, keepdims=True)
        if best is None:
            best, best_error = c, error
        else:
            better = error < best_error
            best, best_error = np.where(better, c, best), np.minimum(error, best_error)
    return best.reshape(rows, cols)
