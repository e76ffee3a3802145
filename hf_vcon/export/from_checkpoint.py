"""From a training checkpoint to the merged compressed model.

A ``checkpoint-N`` folder of a VCON run (or any folder holding a patched model's ``state_dict``, its ``config.json``
and ``vcon_config.json``) is training state: the compressed layers' dense weights sit under
``….base_layer.weight`` next to the VCON tensors, so plain ``from_pretrained`` would initialise those layers at
random. :func:`load_training_checkpoint` rebuilds the patched model from it, strictly, and
:func:`export_checkpoint` writes the merged compressed model that plain ``from_pretrained`` loads
(``python -m hf_vcon export checkpoint-N out/`` does the same from a shell).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

from ..config.vcon_config import CONFIG_NAME, VConConfig
from ..errors import IncompatibleCheckpointError
from ..patching.summary import VConSummary
from ..patching.verbs import apply_vcon, set_step
from .files import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, architecture_class, is_vcon_key, module_key_names
from .run import TRAINING_ARGS_NAME, export_run

TRAINER_STATE_NAME = "trainer_state.json"
_SHOWN = 5
# Files of a Trainer checkpoint that are not the processing class (tokenizer, image processor…).
_TRAINING_FILES = {"config.json", "generation_config.json", CONFIG_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME,
                   "optimizer.pt", "scheduler.pt", "scaler.pt", "README.md", SAFE_WEIGHTS_INDEX_NAME,
                   "pytorch_model.bin.index.json"}
_MODEL_FILES = ("config.json", SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, "pytorch_model.bin")


def _read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: safetensors (single or sharded) or ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return {key: value for shard in shards for key, value in load_file(os.path.join(folder, shard)).items()}
    if os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_NAME)):
        return load_file(os.path.join(folder, SAFE_WEIGHTS_NAME))
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise IncompatibleCheckpointError(
        f"{folder!r} holds no {SAFE_WEIGHTS_NAME}, sharded safetensors or pytorch_model.bin (an FSDP sharded "
        "checkpoint? Save with fsdp_state_dict_type FULL_STATE_DICT, or resume and call VConTrainer.save_model())."
    )


def _build_model(folder: str, saved: dict[str, torch.Tensor]) -> nn.Module:
    """The model class ``config.json`` names, built from it in the checkpoint's floating dtype."""
    import transformers

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise IncompatibleCheckpointError(f"{folder!r} has no config.json: it is not a transformers checkpoint.")
    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = architecture_class(config, folder)
    dtype = next((tensor.dtype for tensor in saved.values() if tensor.is_floating_point()), torch.float32)
    return model_class(config).to(dtype)


def _check_keys(model: nn.Module, saved: dict[str, torch.Tensor], folder: str) -> None:
    """Raise unless ``saved`` holds exactly the patched model's tensors (a tied tensor may be stored once)."""
    expected = model.state_dict()
    stored_storage = {expected[key].data_ptr() for key in saved if key in expected}
    missing = sorted(key for key in expected.keys() - saved.keys() if expected[key].data_ptr() not in stored_storage)
    unexpected = sorted(saved.keys() - expected.keys())
    if not missing and not unexpected:
        mis_shaped = sorted(key for key in saved if saved[key].shape != expected[key].shape)
        if not mis_shaped:
            return
        raise IncompatibleCheckpointError(
            f"Tensors of {folder!r} have other shapes than its vcon_config.json gives the model: {mis_shaped[:_SHOWN]}."
        )
    hint = ""
    if missing and not any(is_vcon_key(key) for key in saved):
        hint = " It holds no VCON tensors: is it a merged model already (plain from_pretrained loads it)?"
    raise IncompatibleCheckpointError(
        f"The tensors of {folder!r} do not match the model its config.json and vcon_config.json describe: "
        f"{len(missing)} missing (e.g. {missing[:_SHOWN]}), {len(unexpected)} unexpected (e.g. {unexpected[:_SHOWN]})."
        + hint
    )


def _trainer_state(folder: str):
    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return None
    from transformers import TrainerState

    return TrainerState.load_from_json(path)


def load_training_checkpoint(folder: str) -> nn.Module:
    """The patched model a training checkpoint holds, at the step it was saved.

    The model class is rebuilt from ``config.json``, patched with the folder's ``vcon_config.json``, and every
    tensor is loaded strictly; β is set from ``trainer_state.json``'s step, when there is one.

    Args:
        folder: a ``checkpoint-N`` folder of a ``VConTrainer`` / ``VConCallback`` run, or any folder with a patched
            model's state dict, its ``config.json`` and ``vcon_config.json``.

    Returns:
        The patched model (a ``PreTrainedModel`` with VCON layers), in eval mode.

    Raises:
        FileNotFoundError: if ``folder`` is not a folder.
        IncompatibleCheckpointError: no ``vcon_config.json`` or ``config.json``, an architecture transformers
            lacks, or tensors missing from, extra to or mis-shaped for the model (a merged model, say so).

    Example:
        ```python
        model = load_training_checkpoint("out/checkpoint-500")
        hf_vcon.save_compressed(model, "out/compact")
        ```
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder.")
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise IncompatibleCheckpointError(
            f"{folder!r} has no {CONFIG_NAME}: it is not the training state of a VCON run."
        )
    vcon_config = VConConfig.from_pretrained(folder)
    saved = _read_state_dict(folder)
    model = apply_vcon(_build_model(folder, saved), vcon_config)
    saved = {renamed: saved[key] for key, renamed in module_key_names(model, saved, folder).items()}
    _check_keys(model, saved, folder)
    model.load_state_dict(saved, strict=False)  # strict up to tied tensors, checked above
    state = _trainer_state(folder)
    if state is not None:
        set_step(model, state.global_step, state.max_steps or None)
    return model.eval()


def _copy_processing_files(folder: str, output_dir: str) -> None:
    """The tokenizer / image processor files the Trainer saved with the checkpoint."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        training_file = name in _TRAINING_FILES or name.startswith(("rng_state", "model", "pytorch_model"))
        if os.path.isfile(path) and not training_file:
            shutil.copy2(path, os.path.join(output_dir, name))


def export_checkpoint(folder: str, output_dir: str, overwrite: bool = False) -> VConSummary:
    """Write the merged compressed model of a training checkpoint to ``output_dir``, as the end of training would.

    The folder gets the merged model (plain ``from_pretrained`` loads it), ``config.json``, ``vcon_config.json``,
    the checkpoint's processing-class files and ``training_args.bin``, and a model card with the checkpoint's
    evaluation metrics. A checkpoint saved mid-transition warns, as saving then would: the export is the
    compressed model (β = 0).

    Args:
        folder: the checkpoint (see :func:`load_training_checkpoint`).
        output_dir: where the merged model goes; never the checkpoint folder itself.
        overwrite: replace a model already in ``output_dir`` (refused otherwise).

    Returns:
        The compression's summary.

    Raises:
        IncompatibleCheckpointError: as :func:`load_training_checkpoint`.
        FileExistsError: if ``output_dir`` holds a model and ``overwrite`` is false.
        ValueError: if ``output_dir`` is the checkpoint folder.
    """
    folder, output_dir = os.fspath(folder), os.fspath(output_dir)
    if os.path.abspath(folder) == os.path.abspath(output_dir):
        raise ValueError(f"output_dir={output_dir!r} is the checkpoint itself; give another folder.")
    held = [name for name in _MODEL_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if held and not overwrite:
        raise FileExistsError(f"{output_dir!r} already holds a model ({held[0]}); pass overwrite=True (--overwrite) "
                              "to replace it, or choose another folder.")
    model = load_training_checkpoint(folder)
    os.makedirs(output_dir, exist_ok=True)
    _copy_processing_files(folder, output_dir)
    if os.path.isfile(os.path.join(folder, TRAINING_ARGS_NAME)):
        shutil.copy2(os.path.join(folder, TRAINING_ARGS_NAME), os.path.join(output_dir, TRAINING_ARGS_NAME))
    return export_run(model, output_dir, trainer_state=_trainer_state(folder))
