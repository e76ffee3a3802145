"""The example scripts' distillation flags: the comparison's compressed arms distil from the dense arm, a single run
from a given teacher, and bad flags or a checkpoint of another distillation stop the script naming the flag."""

from __future__ import annotations

import os

import pytest
import torch

from test_examples import (  # noqa: F401  (csv_files and tiny_text_model are fixtures)
    COMMON,
    GLUE,
    TINY_VIT,
    VISION,
    csv_files,
    expect_usage_error,
    glue_args,
    load_script,
    read_json,
    tiny_text_model,
)


def logged(folder: str, key: str) -> list[float]:
    history = read_json(os.path.join(folder, "trainer_state.json"))["log_history"]
    return [entry[key] for entry in history if key in entry]


def test_vision_comparison_distils_both_compressed_arms_from_the_dense_one(tmp_path, capsys):
    out = str(tmp_path / "out")
    vision, threads = load_script(VISION), torch.get_num_threads()
    try:  # in this process (faster than a subprocess); the script sets one thread for the digits on a CPU
        vision.main(["--config_overrides", TINY_VIT, "--max_train_samples", "64", "--max_eval_samples", "32",
                     "--vcon_method", "prune", "--vcon_transition_steps", "2", "--output_dir", out,
                     "--vcon_distill_alpha", "0.5", "--vcon_distill_temperature", "2", "--logging_steps", "1", *COMMON])
    finally:
        torch.set_num_threads(threads)
    assert "post-shot and VCON distilled from the dense model (α = 0.5, T = 2)" in capsys.readouterr().out
    assert len(logged(out, "distill/kd_loss")) == len(logged(os.path.join(out, "post-shot"), "distill/kd_loss")) == 4
    assert logged(out, "distill/kd_loss")[0] == 0.0  # VCON starts at β = 1: the student is the teacher
    assert logged(os.path.join(out, "post-shot"), "distill/kd_loss")[0] > 0  # post-shot is compressed from step 0
    assert not logged(os.path.join(out, "dense"), "distill/kd_loss")


def test_glue_single_run_distils_from_a_given_teacher_and_resume_checks_its_flags(tiny_text_model, csv_files, tmp_path,
                                                                                    capsys):
    glue = load_script(GLUE)
    out = str(tmp_path / "out")
    flags = ("--vcon_sparsity", "0.5", "--vcon_transition_steps", "2", "--logging_steps", "1", "--vcon_distill_alpha",
             "0.7", "--vcon_teacher_model_name_or_path", tiny_text_model, "--vcon_teacher_dtype", "bfloat16")
    glue.main(glue_args(tiny_text_model, csv_files, out, "--save_strategy", "steps", "--save_steps", "2", *flags))
    assert len(logged(out, "distill/kd_loss")) == 4 and len(logged(out, "distill/task_loss")) == 4
    checkpoint = os.path.join(out, "checkpoint-2")
    assert read_json(os.path.join(checkpoint, "vcon_distillation.json"))["distillation"]["teacher_dtype"] == "bfloat16"
    other = [value if value != "0.7" else "0.9" for value in flags]
    error = expect_usage_error(GLUE, glue_args(tiny_text_model, csv_files, str(tmp_path / "again"),
                                               "--resume_from_checkpoint", checkpoint, *other), "--vcon_distill_alpha",
                               capsys)
    assert "alpha: checkpoint 0.7 vs now 0.9" in error
    without = [value for value in flags[:6]]
    expect_usage_error(GLUE, glue_args(tiny_text_model, csv_files, str(tmp_path / "plain"), "--resume_from_checkpoint",
                                       checkpoint, *without), "--vcon_distill_alpha", capsys)


@pytest.mark.parametrize("argv, flag", [
    (["--vcon_distill_alpha", "2"], "--vcon_distill_alpha"),
    (["--vcon_distill_temperature", "3"], "--vcon_distill_temperature"),
    (["--vcon_distill_alpha", "0.5", "--vcon_distill_temperature", "0"], "--vcon_distill_temperature"),
    (["--vcon_distill_alpha", "0.5", "--vcon_teacher_dtype", "int8"], "--vcon_teacher_dtype"),
    (["--vcon_distill_alpha", "0.5", "--vcon_distill_hidden_layers", "last"], "--vcon_distill_hidden_layers"),
    (["--vcon_distill_alpha", "0.5", "--vcon_method", "none"], "--vcon_distill_alpha"),
    (["--vcon_distill_alpha", "0.5", "--vcon_teacher_model_name_or_path", "/no/such/teacher"],
     "--vcon_teacher_model_name_or_path"),
], ids=["alpha", "temperature-without-alpha", "temperature", "dtype", "hidden-layers", "dense", "teacher"])
def test_bad_distillation_flags_stop_the_script_naming_the_flag(argv, flag, tmp_path, capsys):
    expect_usage_error(VISION, ["--output_dir", str(tmp_path / "o"), *argv], flag, capsys)
    assert not os.path.exists(tmp_path / "o")
