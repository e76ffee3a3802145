"""The example scripts end to end on tiny offline inputs (a tiny config model, CSV rows or digit images), and their
answers to bad input: a message naming the flag, exit code 2, before any training."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from test_trainer import fake_hub  # noqa: F401  (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLUE = os.path.join(REPO, "examples", "glue", "run_glue_vcon.py")
VISION = os.path.join(REPO, "examples", "vision", "run_image_classification_vcon.py")
TINY_VIT = "hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32"
COMMON = ["--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
          "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "--save_strategy", "no", "--seed", "0"]


def run_script(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(f"example_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def query_weight(model) -> torch.Tensor:
    """The first attention query weight (``query`` in transformers 4, ``q_proj`` in some 5.x models)."""
    return next(value for key, value in model.state_dict().items() if key.endswith(("query.weight", "q_proj.weight")))


# ------------------------------------------------------------------------------------------------ fixtures
WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


def tiny_tokenizer(max_length: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the test's words, built with ``tokenizers`` (nothing from the Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was",
                                                 "and", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> str:
    """A folder with a tiny BERT built from a config and its tokenizer, as ``--model_name_or_path``."""
    folder = str(tmp_path_factory.mktemp("tiny-bert"))
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def csv_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("csv")
    paths = {}
    for split, count in (("train", 24), ("validation", 12), ("test", 6)):
        paths[split] = str(folder / f"{split}.csv")
        with open(paths[split], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "label"])
            for i in range(count):
                writer.writerow([f"the film was {WORDS[i % 6]} and {WORDS[(i * 5) % 6]}", int(i % 6 < 3)])
    return paths


def glue_args(model: str, files: dict, out: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--train_file", files["train"], "--validation_file", files["validation"],
            "--max_seq_length", "16", "--output_dir", out, *COMMON, *extra]


# ------------------------------------------------------------------------------------------------- end to end
def test_glue_script_prune_end_to_end(tiny_text_model, csv_files, tmp_path):
    out = str(tmp_path / "out")
    result = run_script(GLUE, glue_args(tiny_text_model, csv_files, out, "--test_file", csv_files["test"], "--do_train",
                                        "--do_eval", "--do_predict", "--vcon_method", "prune", "--vcon_sparsity",
                                        "0.5", "--vcon_transition_steps", "2"))
    assert (result.stdout + result.stderr).count("local implementation of the same metric") == 1  # offline, said once
    model = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers, no hf_vcon
    query = query_weight(model)
    assert (query == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert model.classifier.weight.ne(0).all()  # the head stays dense
    results = read_json(os.path.join(out, "all_results.json"))
    assert {"eval_accuracy", "eval_loss", "eval_samples", "train_loss", "train_samples"} <= set(results)
    assert read_json(os.path.join(out, "eval_results.json"))["eval_samples"] == 12
    assert read_json(os.path.join(out, "vcon_config.json"))["method"] == "prune"
    with open(os.path.join(out, "predict_results_test.txt"), encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) == 1 + 6
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))


def test_vision_script_compare_end_to_end(tmp_path):
    """The offline default (digits, ViT from a config, three arms), shrunk: a tiny ViT, a few images and steps."""
    out = str(tmp_path / "out")
    result = run_script(VISION, ["--config_overrides", TINY_VIT, "--max_train_samples", "64", "--max_eval_samples",
                                 "32", "--vcon_method", "binary", "--vcon_transition_steps", "2", "--output_dir", out,
                                 *COMMON])
    for row in ("| dense |", "| post-shot |", "| VCON |", f"Saved the merged VCON model to {os.path.abspath(out)}"):
        assert row in result.stdout
    model = AutoModelForImageClassification.from_pretrained(out)
    # binary weights are saved as compressed-tensors (2-bit codes, scale α), unpacked by the first forward
    assert read_json(os.path.join(out, "config.json"))["quantization_config"]["format"] == "pack-quantized"
    with torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, model.config.image_size, model.config.image_size))
    weight = query_weight(model)
    assert torch.unique(weight.abs()).numel() == 1  # sign(W)·mean|W|: one magnitude per tensor
    results = read_json(os.path.join(out, "all_results.json"))
    expected = {"eval_accuracy", "train_loss", "dense_eval_accuracy", "postshot_eval_accuracy", "vcon_eval_accuracy",
                "targeted_bytes_before", "targeted_bytes_after"}
    assert expected <= set(results)
    assert results["targeted_bytes_after"] < results["targeted_bytes_before"] / 8
    assert results["vcon_eval_accuracy"] == results["eval_accuracy"]
    for arm in ("dense", "post-shot"):
        assert "eval_accuracy" in read_json(os.path.join(out, arm, "eval_results.json"))
    assert not os.path.exists(os.path.join(out, "dense", "vcon_config.json"))
    assert read_json(os.path.join(out, "post-shot", "vcon_config.json"))["transition_steps"] == 0
    assert os.path.isfile(os.path.join(out, "preprocessor_config.json"))


def test_glue_script_takes_per_module_settings_as_json(tiny_text_model, csv_files, tmp_path):
    glue = load_script(GLUE)
    out = str(tmp_path / "out")
    glue.main(glue_args(tiny_text_model, csv_files, out, "--vcon_sparsity", "0.5", "--vcon_transition_steps", "2",
                        "--vcon_module_overrides", '{"query": {"sparsity": 0.25}}', "--max_steps", "3"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    zeros = {key: float((value == 0).float().mean()) for key, value in model.state_dict().items()
             if key.endswith(("query.weight", "key.weight"))}
    assert zeros and all(value == pytest.approx(0.25 if "query" in key else 0.5, abs=1e-3) for key, value in zeros.items())
    assert read_json(os.path.join(out, "vcon_config.json"))["module_overrides"] == {"query": {"sparsity": 0.25}}


def test_glue_script_dense_reference_in_process(tiny_text_model, csv_files, tmp_path):
    """--vcon_method none: a plain Trainer, a plain checkpoint."""
    glue = load_script(GLUE)
    out = str(tmp_path / "out")
    metrics = glue.main(glue_args(tiny_text_model, csv_files, out, "--vcon_method", "none", "--max_steps", "2"))
    assert "eval_accuracy" in metrics
    assert not os.path.exists(os.path.join(out, "vcon_config.json"))
    AutoModelForSequenceClassification.from_pretrained(out)


# -------------------------------------------------------------------------------------------------- bad input
def expect_usage_error(script: str, argv: list[str], flag: str, capsys) -> str:
    module = load_script(script)
    with pytest.raises(SystemExit) as raised:
        module.run_main(module.main, argv)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert flag in error, error
    return error


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--task_name", "sst3"], "--task_name"),
        (["--train_file", "missing.csv", "--validation_file", "missing.csv"], "--train_file"),
        ([], "--task_name"),
        (["--task_name", "sst2", "--vcon_method", "int4"], "--vcon_method"),
        (["--task_name", "sst2", "--vcon_method", "lowrank", "--vcon_rank_ratio", "1.5"], "--vcon_rank_ratio"),
        (["--task_name", "sst2", "--vcon_method", "none", "--vcon_sparsity", "0.5"], "--vcon_sparsity"),
        (["--task_name", "sst2", "--vcon_transition_steps", "soon"], "--vcon_transition_steps"),
        (["--task_name", "sst2", "--vcon_module_overrides", "{query: 1}"], "--vcon_module_overrides"),
        (["--task_name", "sst2", "--vcon_module_overrides", '{"query": {"sparsity": 2}}'], "--vcon_module_overrides"),
        (["--task_name", "sst2", "--vcon_method", "binary", "--vcon_rank", "2"], "--vcon_rank"),
    ],
    ids=["unknown-task", "missing-files", "no-data", "unknown-method", "bad-rank-ratio", "option-of-none", "bad-q",
         "overrides-not-json", "overrides-bad-option", "option-of-another-method"],
)
def test_glue_script_rejects_bad_flags(argv, flag, tmp_path, capsys):
    error = expect_usage_error(GLUE, ["--model_name_or_path", "unused", "--output_dir", str(tmp_path / "o"), *argv],
                               flag, capsys)
    if flag == "--vcon_method":
        assert "none" in error and "prune" in error


def test_glue_script_rejects_missing_label_column(tiny_text_model, csv_files, tmp_path, capsys):
    error = expect_usage_error(GLUE, glue_args(tiny_text_model, csv_files, str(tmp_path / "o"), "--label_column_name",
                                               "stars"), "--label_column_name", capsys)
    assert "sentence" in error  # lists the columns there are
    assert not os.path.exists(tmp_path / "o" / "train_results.json")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--vcon_method", "int4"], "--vcon_method"),
        (["--label_column_name", "digit"], "--label_column_name"),
        (["--image_column_name", "pixels"], "--image_column_name"),
        (["--train_dir", "no-such-folder"], "--train_dir"),
    ],
    ids=["unknown-method", "label-column", "image-column", "missing-folder"],
)
def test_vision_script_rejects_bad_flags(argv, flag, tmp_path, capsys):
    expect_usage_error(VISION, ["--output_dir", str(tmp_path / "o"), *argv], flag, capsys)


@pytest.mark.parametrize("script", [GLUE, VISION], ids=["glue", "vision"])
def test_scripts_never_overwrite_a_saved_model(script, tmp_path, capsys):
    out = tmp_path / "saved"
    out.mkdir()
    (out / "config.json").write_text("{}")
    argv = ["--output_dir", str(out)] + (["--model_name_or_path", "unused", "--task_name", "sst2"] if script == GLUE else [])
    error = expect_usage_error(script, argv, "--output_dir", capsys)
    assert "--overwrite_output_dir" in error
    assert (out / "config.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------ resume (issue: flag wins)
def test_glue_resume_from_checkpoint_wins_and_is_checked(tiny_text_model, csv_files, tmp_path, capsys):
    glue = load_script(GLUE)
    first = str(tmp_path / "first")
    glue.main(glue_args(tiny_text_model, csv_files, first, "--vcon_sparsity", "0.5", "--vcon_transition_steps", "3",
                        "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"))
    checkpoint = os.path.join(first, "checkpoint-2")
    assert os.path.isfile(os.path.join(checkpoint, "vcon_config.json"))
    state = read_json(os.path.join(checkpoint, "trainer_state.json"))
    state["log_history"].insert(0, {"step": 0, "marker": 1.0})  # only a run resumed from it carries this entry
    with open(os.path.join(checkpoint, "trainer_state.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle)

    resumed = str(tmp_path / "resumed")  # another folder: only the flag can point at the checkpoint
    glue.main(glue_args(tiny_text_model, csv_files, resumed, "--vcon_sparsity", "0.5", "--vcon_transition_steps", "3",
                        "--logging_steps", "1", "--resume_from_checkpoint", checkpoint))
    history = read_json(os.path.join(resumed, "trainer_state.json"))["log_history"]
    assert history[0] == {"step": 0, "marker": 1.0}  # continued from the checkpoint, not trained from scratch
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]

    for extra, flag, words in (
        (["--resume_from_checkpoint", str(tmp_path / "does-not-exist")], "--resume_from_checkpoint", "does not exist"),
        (["--resume_from_checkpoint", checkpoint, "--vcon_sparsity", "0.75"], "--vcon_sparsity",
         "sparsity: checkpoint 0.5 vs now 0.75"),
        (["--resume_from_checkpoint", checkpoint, "--vcon_method", "none"], "--vcon_method", "is of a VCON run"),
        (["--resume_from_checkpoint", checkpoint, "--vcon_compare"], "--resume_from_checkpoint", "--vcon_compare"),
    ):
        out = tmp_path / f"bad-{flag.strip('-')}-{len(extra)}"
        error = expect_usage_error(GLUE, glue_args(tiny_text_model, csv_files, str(out), "--vcon_transition_steps", "3",
                                                   *extra), flag, capsys)
        assert words in error, error
        assert not out.exists()  # refused before anything was written


# ------------------------------------------------------------- bad inputs, before the data is tokenized (exit 2)
@pytest.fixture(scope="module")
def wide_text_model(tmp_path_factory) -> str:
    """A BERT config with 384×384 attention layers and a tokenizer, but no weights: a check that needs the weights
    (or comes after loading them) fails on --model_name_or_path instead of naming the flag at fault."""
    folder = str(tmp_path_factory.mktemp("wide-bert"))
    tokenizer = tiny_tokenizer()
    BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
               intermediate_size=1536, max_position_embeddings=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "argv, flag, words",
    [
        (["--vcon_method", "lowrank", "--vcon_rank", "300"], "--vcon_rank", "at most 191 to compress"),
        (["--vcon_method", "lowrank", "--vcon_rank", "1000"], "--vcon_rank", "(384, 384)"),
        (["--vcon_target_modules", "nothing_here"], "--vcon_target_modules", "matched no Linear"),
        (["--vcon_prune_pattern", "3:7"], "--vcon_prune_pattern", "divisible by 7"),
        (["--vcon_exclude_modules", "pooler"], "--vcon_exclude_modules", "'pooler.dense'"),
        (["--vcon_module_overrides", '{"qurey": {"sparsity": 0.5}}'], "--vcon_module_overrides", "matches none"),
    ],
    ids=["rank-that-does-not-compress", "rank-too-large", "no-target", "n-m-does-not-divide",
         "exclude-matches-no-linear", "override-matches-nothing"],
)
def test_glue_script_checks_the_compression_against_the_layers_first(wide_text_model, csv_files, tmp_path, capsys,
                                                                    argv, flag, words):
    error = expect_usage_error(GLUE, glue_args(wide_text_model, csv_files, str(tmp_path / "o"), *argv), flag, capsys)
    assert words in error and "Traceback" not in error, error


def write_csv(path, header, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_glue_script_names_the_file_row_and_column_of_an_empty_cell(tiny_text_model, csv_files, tmp_path, capsys):
    rows = [[f"the film was {WORDS[i % 6]}", int(i % 6 < 3)] for i in range(12)]
    rows[4][0] = ""
    files = dict(csv_files, train=write_csv(tmp_path / "holes.csv", ["sentence", "label"], rows))
    error = expect_usage_error(GLUE, glue_args(tiny_text_model, files, str(tmp_path / "o")), "--train_file", capsys)
    assert "row 5 (line 6) of" in error and "holes.csv" in error and "'sentence'" in error


def test_glue_script_predicts_on_an_unlabelled_test_file(tiny_text_model, csv_files, tmp_path):
    test = write_csv(tmp_path / "unlabelled.csv", ["sentence"], [[f"the film was {word}"] for word in WORDS])
    out = str(tmp_path / "out")
    glue = load_script(GLUE)
    glue.main(glue_args(tiny_text_model, csv_files, out, "--test_file", test, "--do_train", "--do_predict",
                        "--max_steps", "2"))
    with open(os.path.join(out, "predict_results_test.txt"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + len(WORDS)
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


# --------------------------------------------------------------------------------------------- --push_to_hub
def test_push_to_hub_offline_stops_before_any_arm_trains(tiny_text_model, csv_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    error = expect_usage_error(GLUE, glue_args(tiny_text_model, csv_files, str(out), "--vcon_compare", "--push_to_hub",
                                               "--hub_model_id", "me/tiny-vcon"), "--push_to_hub", capsys)
    assert "'me/tiny-vcon'" in error and "Traceback" not in error
    assert not out.exists()  # no dense or post-shot arm ran


def test_compare_with_push_to_hub_pushes_only_the_vcon_folder_with_the_table(tiny_text_model, csv_files, tmp_path,
                                                                            fake_hub):
    """Also: without a flag asking for checkpoints (here transformers' default save strategy, which saves at the end
    of every run), the arms of a comparison write none."""
    uploads, _ = fake_hub
    out = str(tmp_path / "out")
    argv = [arg for arg in glue_args(tiny_text_model, csv_files, out) if arg not in ("--save_strategy", "no")]
    load_script(GLUE).main([*argv, "--vcon_compare", "--push_to_hub", "--hub_model_id", "user/tiny-vcon",
                            "--vcon_transition_steps", "2"])
    assert uploads and {upload["folder_path"] for upload in uploads} == {out}  # save_model(), then with the card
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "## Comparison" in card and "| post-shot |" in card and "user/tiny-vcon" in card
    for folder in (out, os.path.join(out, "dense"), os.path.join(out, "post-shot")):
        assert not [name for name in os.listdir(folder) if name.startswith("checkpoint-")], folder


# ----------------------------------------------------------------------------------- a transition longer than the run
def test_glue_script_warns_up_front_and_reports_the_saved_model_when_q_outlasts_the_run(tiny_text_model, csv_files,
                                                                                        tmp_path, recwarn):
    out = str(tmp_path / "out")
    metrics = load_script(GLUE).main(glue_args(tiny_text_model, csv_files, out, "--vcon_transition_steps", "100"))
    assert any("ends at optimizer step 100" in str(warning.message) for warning in recwarn)
    results = read_json(os.path.join(out, "eval_results.json"))
    assert {"eval_loss", "eval_accuracy", "eval_blended_loss", "eval_blended_accuracy"} <= set(results)
    assert metrics["eval_loss"] == results["eval_loss"]

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()  # the saved model, without hf_vcon
    tokenizer = tiny_tokenizer()
    with open(csv_files["validation"], encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    batch = tokenizer([row["sentence"] for row in rows], padding="max_length", max_length=16, truncation=True,
                      return_tensors="pt")
    labels = torch.tensor([int(row["label"]) for row in rows])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels).item()
    assert results["eval_loss"] == pytest.approx(loss, abs=1e-5)  # eval_* is the saved model's
    assert results["eval_blended_loss"] != pytest.approx(loss, abs=1e-5)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "training stopped at step 4, before the transition's end (step 100)" in card
    assert "| eval_runtime |" not in card and "from transformers import AutoModelForSequenceClassification" in card
