"""What the scripts check before any data is tokenized or any arm trains, each failure a :class:`UsageError` naming
the flag: the output folder and the checkpoint to resume from, the Hub repo, the compression against the model's
layers, and the data's text and label cells."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Optional

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_vcon import NoTargetModulesError, VConConfig, VConError, VConWarning, apply_vcon
from hf_vcon.training.resume import config_differences
from hf_vcon.config.vcon_config import CONFIG_NAME as VCON_CONFIG_NAME
from hf_vcon.export.merged import COMPRESSED_TENSORS, resolve_export_format
from hf_vcon.patching.plan import plan_for, resolve_targets

from .distill_flags import check_distill_checkpoint, check_distill_flags
from .flags import UsageError, VConCommonArguments, flags_named

logger = logging.getLogger("vcon_examples")

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "vcon_config.json")
TRAINER_STATE = "trainer_state.json"


# ------------------------------------------------------------------------------------ output folder, resume
def _refuse_a_saved_model(out: str) -> None:
    saved = [name for name in MODEL_FILES if os.path.isfile(os.path.join(out, name))]
    if saved:
        raise UsageError(
            f"argument --output_dir: {out!r} already holds a model ({saved[0]}); pass --overwrite_output_dir to "
            "replace it, or choose another --output_dir."
        )


def _given_checkpoint(path: str, compare: bool) -> str:
    """``--resume_from_checkpoint``, checked: it wins over any checkpoint in ``--output_dir``."""
    if compare:
        raise UsageError("argument --resume_from_checkpoint: a --vcon_compare run trains its three arms from the "
                         "start; resume a single arm instead (run without --vcon_compare).")
    if not os.path.isdir(path):
        raise UsageError(f"argument --resume_from_checkpoint: {path!r} does not exist; give a checkpoint-N folder of "
                         "an earlier run.")
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise UsageError(f"argument --resume_from_checkpoint: {path!r} is not a Trainer checkpoint (it has no "
                         f"{TRAINER_STATE}); give a checkpoint-N folder of an earlier run.")
    return path


def check_output_dir(training_args: TrainingArguments, overwrite: bool, compare: bool = False) -> Optional[str]:
    """Refuse to overwrite a saved model; return the checkpoint to resume from, if any.

    ``--resume_from_checkpoint`` wins, as in transformers' scripts; otherwise the last ``checkpoint-N`` in
    ``--output_dir`` is resumed (not with ``--vcon_compare``, whose arms always start afresh).

    Raises:
        UsageError: if ``--output_dir`` holds a model, or is not empty and holds no checkpoint, unless ``overwrite``;
            if ``--resume_from_checkpoint`` is not a checkpoint folder, or is given with ``--vcon_compare``.
    """
    out = training_args.output_dir
    if not training_args.do_train:
        return None
    given = training_args.resume_from_checkpoint
    if given is not None:
        if not overwrite and os.path.isdir(out):
            _refuse_a_saved_model(out)
        return _given_checkpoint(given, compare)
    if overwrite or not os.path.isdir(out) or not os.listdir(out):
        return None
    _refuse_a_saved_model(out)
    last = None if compare else get_last_checkpoint(out)
    if last is None:
        raise UsageError(
            f"argument --output_dir: {out!r} exists and is not empty; pass --overwrite_output_dir to write into it "
            "anyway, or choose another --output_dir."
        )
    logger.warning(f"Resuming from {last}; pass --overwrite_output_dir to train from scratch instead.")
    return last


def check_checkpoint_fits(checkpoint: Optional[str], config: Optional[VConConfig]) -> None:
    """Refuse a checkpoint written with other ``--vcon_*`` flags (or with / without VCON), naming the flags.

    Raises:
        UsageError: naming the ``--vcon_…`` flags whose values differ from the checkpoint's ``vcon_config.json``.
    """
    if checkpoint is None:
        return
    has_vcon = os.path.isfile(os.path.join(checkpoint, VCON_CONFIG_NAME))
    if config is None and has_vcon:
        raise UsageError(f"argument --vcon_method: the checkpoint {checkpoint!r} is of a VCON run (it has "
                         f"{VCON_CONFIG_NAME}); resume it with the --vcon_* flags it was trained with.")
    if config is not None and not has_vcon:
        raise UsageError(f"argument --vcon_method: the checkpoint {checkpoint!r} has no {VCON_CONFIG_NAME}: it is not "
                         "of a VCON run; resume it with --vcon_method none, or train afresh in another --output_dir.")
    if config is None:
        return
    differences = config_differences(VConConfig.from_pretrained(checkpoint), config)
    if differences:
        names = [difference.split(":")[0] for difference in differences]
        raise UsageError(
            f"argument {flags_named(' '.join(names), names)}: the checkpoint {checkpoint!r} was trained with other "
            f"--vcon_* values ({'; '.join(differences)}). Resume with the values in its {VCON_CONFIG_NAME}, or train "
            "afresh in another --output_dir."
        )


def check_flags(training_args: TrainingArguments, vcon_args: VConCommonArguments,
                overwrite: bool) -> tuple[Optional[VConConfig], Optional[str]]:
    """Every check that needs no data and no model: the ``--vcon_*`` flags (distillation's too), the output folder,
    the checkpoint to resume from and the Hub repo. Returns the VConConfig (``None`` for ``--vcon_method none``) and
    the checkpoint."""
    config = vcon_args.to_vcon_config()
    distills = hasattr(vcon_args, "distillation_config")
    if distills:
        check_distill_flags(vcon_args, config is not None)
    checkpoint = check_output_dir(training_args, overwrite, compare=vcon_args.vcon_compare and config is not None)
    check_checkpoint_fits(checkpoint, config)
    if distills:
        check_distill_checkpoint(vcon_args, checkpoint)
    check_hub(training_args)
    return config, checkpoint


# ------------------------------------------------------------------------------------------------ the Hub
def check_hub(training_args: TrainingArguments) -> None:
    """With ``--push_to_hub``, create (or find) the Hub repo now, as the Trainer would when the trained arm is built.

    Raises:
        UsageError: if the Hub cannot be reached (offline mode, no network, no token, no permission), before any
            data is read or any arm trains.
    """
    if not training_args.push_to_hub or not training_args.should_save:
        return
    from huggingface_hub import HfApi

    repo = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    try:
        HfApi().create_repo(repo, token=training_args.hub_token, exist_ok=True,
                            private=getattr(training_args, "hub_private_repo", None))
    except Exception as error:  # OfflineModeIsEnabled, HTTP and connection errors all mean the push would fail
        raise UsageError(
            f"argument --push_to_hub: the Hub repo {repo!r} cannot be created or reached ({type(error).__name__}: "
            f"{error}). Check the network, HF_HUB_OFFLINE and your token (`hf auth login`), or run without "
            "--push_to_hub and upload the folder later with `hf upload <your-name>/<repo> <output_dir>`."
        ) from None


# ------------------------------------------------------------------------------------- the model's layers
def check_vcon_fits(build_skeleton: Callable[[], torch.nn.Module], config: Optional[VConConfig],
                    vcon_args: VConCommonArguments) -> None:
    """Plan the compression on the model's skeleton (built on the meta device: shapes, no weights), so that targets
    matching nothing, exclusions matching no Linear, ranks that do not compress, N:M patterns that do not divide
    a layer or a ``--vcon_export_format compressed-tensors`` that cannot write the model stop the script before
    the data is tokenized or the weights are loaded.

    Raises:
        UsageError: naming the ``--vcon_…`` flag, with the library's explanation.
    """
    if config is None:
        return
    try:
        with torch.device("meta"):
            skeleton = build_skeleton()
    except Exception as error:  # a model that cannot be built without weights: VConTrainer checks it when built
        logger.warning(f"Could not build the model's skeleton to check the --vcon_* flags early ({error}); they are "
                       "checked when the model is loaded.")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VConWarning)
        try:
            plan_for(skeleton, config, resolve_targets(skeleton, config))
        except NoTargetModulesError as error:
            raise UsageError(f"argument --vcon_target_modules: {error}") from None
        except ValueError as error:
            raise UsageError(f"argument {vcon_args.flag_for(str(error))}: {error}") from None
    for warning in caught:
        if "exclude_modules" in str(warning.message):
            raise UsageError(f"argument --vcon_exclude_modules: {warning.message}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if vcon_args.vcon_export_format == COMPRESSED_TENSORS:
        check_export_format(skeleton, config)


def check_export_format(skeleton: torch.nn.Module, config: VConConfig) -> None:
    """Refuse ``--vcon_export_format compressed-tensors`` for a model the format cannot hold (no quantized layer,
    GPT-2's Conv1D, a tied quantized head) or without the package, from the patched skeleton."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VConWarning)
        patched = apply_vcon(skeleton, config)
    try:
        resolve_export_format(patched, COMPRESSED_TENSORS)
    except VConError as error:
        raise UsageError(f"argument --vcon_export_format: {error}") from None


# ------------------------------------------------------------------------------------------------ the data
def check_cells(dataset: Any, columns: list[str], flag: str, source: str, allow_empty: tuple[str, ...] = ()) -> None:
    """Refuse a split whose ``columns`` have an empty cell (``None``), naming the file or dataset, row and column.

    Args:
        dataset: one split (a ``datasets.Dataset``).
        columns: the columns every row must fill (text columns, the label).
        flag: the flag that named the data (``--train_file``…); source: the file or dataset name.
        allow_empty: columns whose cells may all be empty (an unlabelled test set's label).

    Raises:
        UsageError: naming the flag, the source, the row (1-based; in a CSV file, line row + 1) and the column.
    """
    for column in columns:
        values = dataset[column]
        empty = [index for index, value in enumerate(values) if value is None]
        if not empty or (column in allow_empty and len(empty) == len(values)):
            continue
        where = f"row {empty[0] + 1}" + (f" (line {empty[0] + 2})" if str(source).endswith(".csv") else "")
        raise UsageError(
            f"argument {flag}: {where} of {source!r} has an empty {column!r} cell ({len(empty)} of its {len(values)} "
            f"rows have one); fill or remove those rows."
        )
