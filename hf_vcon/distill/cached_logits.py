"""Cached teacher logits: run the teacher once over a fixed training set, save its logits, and read them back in any
number of runs (arms, seeds) instead of running the teacher at every step.

The file is safetensors: ``logits`` (one row per example, or one per kept token of a language model, in the dtype
asked for), ``offsets`` (example i owns rows ``offsets[i]:offsets[i + 1]``) and ``checksums`` (per example, a
position-weighted sum of the model inputs it was computed from), with the format, the teacher and the shapes in the
metadata. A training example says which cached example it is by its index under ``index_column``
(:func:`add_teacher_index`), so the training set may be shuffled, subsampled or bucketed freely.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import IncompatibleCheckpointError, VConError
from .losses import describe_model

FORMAT_NAME = "hf_vcon.distill.cached_logits"
FORMAT_VERSION = 1
LABEL_KEYS = ("labels", "label", "label_ids", "shift_labels")
_CHECK_RTOL = 1e-6


# ------------------------------------------------------------------------------------------ the index column
class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset of dict examples, each with its position added under ``column``."""

    def __init__(self, dataset: Sequence[dict], column: str = "teacher_index"):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], self.column: index}


def add_teacher_index(dataset: Any, column: str = "teacher_index") -> Any:
    """``dataset`` with each example's position under ``column``: a ``datasets.Dataset`` gets a column (it follows its
    rows through ``shuffle``, ``select``, ``filter``…), any other map-style dataset of dicts is wrapped.

    Cache the teacher's logits for this same dataset (:func:`cache_teacher_logits`) and train on the result.
    """
    if hasattr(dataset, "add_column") and hasattr(dataset, "column_names"):
        if column in dataset.column_names:
            raise ValueError(f"The dataset has a {column!r} column already; pass another column name.")
        return dataset.add_column(column, list(range(len(dataset))))
    return IndexedDataset(dataset, column)


# ---------------------------------------------------------------------------------------------- checksums
def _position_weights(count: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(count, device=device, dtype=torch.float64)
    return 1.0 + torch.remainder(positions * 7919.0, 1009.0) / 1009.0  # deterministic, in [1, 2)


def input_checksums(inputs: dict, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Per example, ``Σ_key Σ_j w_j·x_j`` (float64) over the model inputs, the positions of token-aligned inputs taken
    where ``attention_mask`` is 1 and counted from the first kept one, so padding (left or right, any length) does
    not change it while another example, order or tokenization does."""
    total = None
    for key in sorted(inputs):
        value = inputs[key]
        if not torch.is_tensor(value) or value.dim() == 0:
            continue
        value = value.detach().double()
        if attention_mask is not None and value.dim() >= 2 and value.shape[:2] == attention_mask.shape:
            keep = attention_mask.bool()
            rank = (torch.cumsum(keep.long(), dim=1) - 1).clamp(min=0)  # a kept position's rank in its row
            width = value[0, 0].numel()
            flat = value.reshape(value.shape[0], value.shape[1], width)
            index = rank.unsqueeze(-1) * width + torch.arange(width, device=value.device)
            weights = _position_weights(int(index.max()) + 1, value.device)[index]
            row = torch.where(keep.unsqueeze(-1), flat * weights, 0.0).sum(dim=(1, 2))
        else:
            flat = value.reshape(value.shape[0], -1)
            row = (flat * _position_weights(flat.shape[1], value.device)).sum(1)
        total = row if total is None else total + row
    if total is None:
        raise VConError("The batch has no tensor inputs to check the cached teacher logits against.")
    return total


# ------------------------------------------------------------------------------------------------- writing
def model_input_names(model: nn.Module) -> Optional[set]:
    """The named arguments of ``model.forward`` (as the Trainer keeps dataset columns), ``None`` if it has none."""
    parameters = inspect.signature(model.forward).parameters.values()
    names = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names or None


def teacher_inputs(batch: dict, names: Optional[set], drop: Iterable[str] = ()) -> dict:
    """The batch without labels, the index column, and keys the model does not take."""
    dropped = set(LABEL_KEYS) | set(drop) | {"num_items_in_batch"}
    return {key: value for key, value in batch.items() if key not in dropped and (names is None or key in names)}


def _rows(logits: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Per example: its logits ``(classes,)`` → one row, or per token ``(tokens, vocab)`` → its kept tokens' rows."""
    if logits.dim() == 2:
        return [row.unsqueeze(0) for row in logits]
    if attention_mask is not None and attention_mask.shape == logits.shape[:2]:
        return [row[mask.bool()] for row, mask in zip(logits, attention_mask)]
    return list(logits)


def _collator(names: Optional[set], index_column: str, collator):
    """``collator`` on examples stripped of the columns the model does not take (as the Trainer strips them)."""
    keep = (names or set()) | set(LABEL_KEYS) | {index_column}

    def strip(example: dict) -> dict:
        return {key: value for key, value in example.items() if names is None or key in keep}

    def collate(examples: list[dict]) -> dict:
        return collator([strip(example) for example in examples])

    return collate


@torch.no_grad()
def _teacher_pass(teacher: nn.Module, dataset: Any, collate, names, index_column: str, batch_size: int, device,
                  dtype: torch.dtype) -> tuple:
    """The teacher's logits over ``dataset`` in order: per-example rows, their lengths, input checksums, whether
    the logits are per token, and the input keys."""
    was_training = teacher.training
    teacher.eval()
    rows, counts, checksums, per_token, input_keys = [], [], [], False, []
    for start in range(0, len(dataset), batch_size):
        positions = list(range(start, min(start + batch_size, len(dataset))))
        batch = collate([dataset[i] for i in positions])
        given = batch.get(index_column)
        if given is not None and [int(i) for i in given] != positions:
            raise VConError(f"The examples' {index_column!r} values are not their positions in the dataset (batch "
                            f"from {start}: {[int(i) for i in given][:4]}…); cache the dataset in its own order.")
        inputs = {key: value.to(device) if torch.is_tensor(value) else value
                  for key, value in teacher_inputs(batch, names, (index_column,)).items()}
        attention_mask = inputs.get("attention_mask")
        input_keys = sorted(key for key, value in inputs.items() if torch.is_tensor(value))
        logits = teacher(**inputs).logits
        example_rows = _rows(logits, attention_mask)
        rows += [row.to("cpu", dtype) for row in example_rows]
        counts += [len(row) for row in example_rows]
        checksums.append(input_checksums(inputs, attention_mask).cpu())
        per_token = logits.dim() == 3
    teacher.train(was_training)
    return rows, counts, checksums, per_token, input_keys


@torch.no_grad()
def cache_teacher_logits(teacher: nn.Module, dataset: Any, path: str, *, data_collator=None, batch_size: int = 32,
                         dtype: torch.dtype = torch.float16, index_column: str = "teacher_index",
                         device: Optional[torch.device] = None, overwrite: bool = False) -> str:
    """Run ``teacher`` (eval mode, no gradient) once over ``dataset`` in its order and save its logits to ``path``.

    Args:
        teacher: the teacher model (e.g. the dense fine-tuned model).
        dataset: the training set as it will be fed (tokenized, map-style, dict examples). Example i of the cache is
            ``dataset[i]``; train on :func:`add_teacher_index` of this dataset (if the examples carry
            ``index_column`` already, it must be their position).
        path: the ``.safetensors`` file to write.
        data_collator: as the Trainer's (default ``transformers.default_data_collator``); padding does not matter,
            only the positions ``attention_mask`` keeps are stored for per-token logits.
        batch_size: examples per teacher forward.
        dtype: the stored dtype (float16 or bfloat16 halve the file; float32 keeps the logits exact).
        device: where the teacher runs (default: where its parameters are).
        overwrite: replace an existing file (never replaced otherwise).

    Returns:
        ``path``. Pass it as ``DistillationConfig(teacher_logits=path)``.

    Raises:
        FileExistsError: if ``path`` exists and not ``overwrite``.
        VConError: if the examples' ``index_column`` values are not their positions.
    """
    from safetensors.torch import save_file
    from transformers import default_data_collator

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it.")
    device = device or next(teacher.parameters()).device
    names = model_input_names(teacher)
    collate = _collator(names, index_column, data_collator or default_data_collator)
    rows, counts, checksums, per_token, input_keys = _teacher_pass(teacher, dataset, collate, names, index_column,
                                                                   batch_size, device, dtype)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "teacher": describe_model(teacher),
                "examples": str(len(counts)), "per_token": json.dumps(per_token), "dtype": str(dtype),
                "input_keys": json.dumps(input_keys if rows else [])}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({"logits": torch.cat(rows).contiguous(), "offsets": offsets, "checksums": torch.cat(checksums)}, path,
              metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------------- reading
class TeacherLogits:
    """The cached logits of :func:`cache_teacher_logits`, read row by row (memory-mapped) for training batches.

    Raises:
        IncompatibleCheckpointError: for a file that is not such a cache or of a newer format.
    """

    def __init__(self, path: str, verify: bool = True):
        from safetensors import safe_open

        self.path, self.verify = path, verify
        self._file = safe_open(path, framework="pt")
        metadata = self._file.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise IncompatibleCheckpointError(f"{path!r} is not a teacher-logits cache (written by "
                                              "hf_vcon.cache_teacher_logits).")
        if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
            raise IncompatibleCheckpointError(f"{path!r} is format {metadata['format_version']}, newer than this "
                                              f"hf_vcon reads ({FORMAT_VERSION}); upgrade hf_vcon.")
        self.metadata = metadata
        self.per_token = json.loads(metadata["per_token"])
        self.input_keys = json.loads(metadata["input_keys"])
        self.offsets = self._file.get_tensor("offsets")
        self.checksums = self._file.get_tensor("checksums")
        self._logits = self._file.get_slice("logits")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def width(self) -> int:
        """The logits per cached row: the teacher's classes or vocabulary."""
        return int(self._logits.get_shape()[-1])

    def rows(self, index: int) -> torch.Tensor:
        return self._logits[int(self.offsets[index]):int(self.offsets[index + 1])]

    def _check(self, indices: list[int], inputs: dict) -> None:
        outside = [i for i in indices if not 0 <= i < len(self)]
        if outside:
            raise VConError(f"Example index {outside[0]} is outside the {len(self)} examples cached in {self.path!r}.")
        if not self.verify:
            return
        missing = [key for key in self.input_keys if not torch.is_tensor(inputs.get(key))]
        if missing:
            raise VConError(f"The batch has no {missing[0]!r}, an input the logits in {self.path!r} were cached from "
                            f"({', '.join(self.input_keys)}).")
        actual = input_checksums({key: inputs[key] for key in self.input_keys}, inputs.get("attention_mask")).cpu()
        expected = self.checksums[indices]
        wrong = ~torch.isclose(actual, expected, rtol=_CHECK_RTOL, atol=_CHECK_RTOL)
        if wrong.any():
            index = indices[int(wrong.nonzero()[0])]
            raise VConError(
                f"The inputs of training example {index} are not those its logits were cached from ({self.path!r}): "
                "the data, its order or its tokenization changed since cache_teacher_logits ran. Cache the teacher's "
                "logits again for this training set (and add_teacher_index to that same set)."
            )

    def batch(self, indices: torch.Tensor, inputs: dict,
              like: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The cached logits of a batch shaped as the student's ``like`` (same device), and a bool mask of the
        positions they cover (per-token caches; ``None`` for per-example ones). ``inputs`` is the training batch.

        Raises:
            VConError: for indices outside the cache, inputs other than those cached, or token counts that differ.
        """
        indices = [int(i) for i in indices.reshape(-1).tolist()]
        attention_mask = inputs.get("attention_mask")
        self._check(indices, inputs)
        if not self.per_token:
            rows = torch.cat([self.rows(i) for i in indices])
            return self._shaped(rows, like), None
        mask = (attention_mask.bool() if attention_mask is not None
                else torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)).to(like.device)
        result = torch.zeros(like.shape, dtype=self._dtype(), device=like.device)
        for row, index in enumerate(indices):
            cached = self.rows(index)
            if len(cached) != int(mask[row].sum()):
                raise VConError(f"Training example {index} has {int(mask[row].sum())} tokens, its cached logits "
                                f"{len(cached)}; cache the teacher's logits again for this training set.")
            result[row, mask[row]] = self._shaped(cached, like[row, mask[row]])
        return result, mask

    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.metadata["dtype"].replace("torch.", ""))

    @staticmethod
    def _shaped(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if rows.shape != like.shape:
            raise VConError(f"Cached teacher logits {tuple(rows.shape)} do not fit the student's logits "
                            f"{tuple(like.shape)}: the cache was written for another model or task.")
        return rows.to(like.device)
