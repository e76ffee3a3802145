"""What a VCON run reports: the compressed model's metrics at every evaluation and the best checkpoint by them, β
in the training logs only, the transition-longer-than-the-run warning, the model card, unmatched exclusions."""

from __future__ import annotations

import re
import warnings

import pytest
import yaml
from transformers import Trainer, TrainerCallback

from conftest import build, tiny_bert
from hf_vcon import VConConfig, VConTrainer, VConWarning, apply_vcon, beta_at
from test_trainer import make_trainer


class Recorder(TrainerCallback):
    """What reporting callbacks (TensorBoard, W&B…) receive: every log entry and every on_evaluate's metrics."""

    def __init__(self):
        self.logs, self.evaluations = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((state.global_step, dict(metrics)))


def recorded_trainer(tmp_path, config, trainer_class=VConTrainer, **overrides):
    trainer = make_trainer(tmp_path, config, trainer_class, **overrides)
    recorder = Recorder()
    trainer.add_callback(recorder)
    return trainer, recorder


# --------------------------------------------------------------------------- compressed metrics, every evaluation
def test_every_evaluation_reports_the_compressed_model_once(tmp_path):
    trainer, recorder = recorded_trainer(tmp_path, VConConfig(method="binary", transition_steps=3), max_steps=6,
                                         eval_strategy="steps", eval_steps=1)
    trainer.train()
    assert [step for step, _ in recorder.evaluations] == [1, 2, 3, 4, 5, 6]  # one on_evaluate per evaluation
    eval_logs = [logs for _, logs in recorder.logs if "eval_loss" in logs]
    assert len(eval_logs) == 6 and all("eval_compressed_loss" in logs for logs in eval_logs)  # one entry each
    for step, metrics in recorder.evaluations:
        assert "eval_compressed_loss" in metrics
        if step < 3:  # β(step) > 0: a second evaluation, of another model
            assert metrics["eval_compressed_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-6)
        else:  # β = 0: the model evaluated is the compressed one
            assert metrics["eval_compressed_loss"] == metrics["eval_loss"]


def test_the_evaluation_of_step_n_sees_the_model_of_step_n(tmp_path):
    """The blended evaluation after optimizer step 1 runs at β(1), not at the β step 0 was trained with."""
    trainer, recorder = recorded_trainer(tmp_path, VConConfig(method="binary", transition_steps=4), max_steps=2,
                                         eval_strategy="steps", eval_steps=1, learning_rate=0.0)
    betas = []
    original = trainer.evaluation_loop

    def evaluation_loop(*args, **kwargs):
        from hf_vcon import get_beta

        betas.append(get_beta(trainer.model))
        return original(*args, **kwargs)

    trainer.evaluation_loop = evaluation_loop
    trainer.train()
    assert betas == [beta_at(1, 4), beta_at(2, 4)]


@pytest.mark.parametrize("metric", [None, "compressed_loss", "eval_loss"])
def test_best_model_is_chosen_by_the_compressed_model(tmp_path, metric):
    """load_best_model_at_end compares like with like: the compressed model's metric at every checkpoint (it used to
    compare the blended model's loss before β = 0 with the compressed model's after, or to crash on
    "compressed_loss" once β = 0)."""
    overrides = {} if metric is None else {"metric_for_best_model": metric}
    trainer, recorder = recorded_trainer(tmp_path, VConConfig(method="binary", transition_steps=4), max_steps=8,
                                         eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                                         load_best_model_at_end=True, **overrides)
    trainer.train()
    assert trainer.args.metric_for_best_model in ("eval_compressed_loss", "compressed_loss")
    assert not trainer.args.greater_is_better
    compressed = {step: metrics["eval_compressed_loss"] for step, metrics in recorder.evaluations}
    best_step = min(compressed, key=compressed.get)
    assert trainer.state.best_metric == compressed[best_step]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")


def test_compressed_metric_names_follow_the_eval_datasets():
    from hf_vcon.utils.logs import compressed_metric_name

    assert compressed_metric_name("accuracy") == "eval_compressed_accuracy"
    assert compressed_metric_name("eval_val_loss", ("val", "val_mm")) == "eval_val_compressed_loss"
    assert compressed_metric_name("eval_val_mm_loss", ("val", "val_mm")) == "eval_val_mm_compressed_loss"


def test_callback_with_load_best_model_at_end_warns(tmp_path):
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=2), Trainer, max_steps=2,
                           eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                           load_best_model_at_end=True)
    with pytest.warns(VConWarning, match="use VConTrainer, which compares them by the compressed model"):
        trainer.train()


# ---------------------------------------------------------------------------------------------------- β in logs
@pytest.mark.parametrize("trainer_class", [VConTrainer, Trainer], ids=["VConTrainer", "VConCallback"])
def test_beta_is_logged_with_training_entries_only(tmp_path, trainer_class):
    trainer, recorder = recorded_trainer(tmp_path, VConConfig(method="binary", transition_steps=6), trainer_class,
                                         max_steps=8, eval_strategy="steps", eval_steps=2)
    trainer.train()
    training = [(step, logs["vcon/beta"]) for step, logs in recorder.logs if "loss" in logs or "train_loss" in logs]
    assert training[:-1] == [(step, pytest.approx(beta_at(step, 6))) for step in range(1, 9)]  # β of the model logged
    betas = [beta for _, beta in training]
    assert betas == sorted(betas, reverse=True)  # never a zig-zag
    assert not any("vcon/beta" in logs for _, logs in recorder.logs if any(key.startswith("eval_") for key in logs))
    history = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert history and not any("vcon/beta" in entry for entry in history)


def test_a_transition_longer_than_the_run_warns_before_training_and_reports_one_beta(tmp_path):
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=100), max_steps=4)
    seen_at_first_step = []

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                seen_at_first_step.append(len(caught))

    trainer.add_callback(FirstStep())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.save_model()
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, VConWarning)]
    assert seen_at_first_step == [1] and "ends at optimizer step 100" in messages[0]
    assert "training stops with β = 0.96 at the last step" in messages[0]
    assert "while β = 0.96 > 0" in messages[1]  # the save warning says the same β
    logged = [entry["vcon/beta"] for entry in trainer.state.log_history if "vcon/beta" in entry]
    assert logged[-2:] == [pytest.approx(0.96)] * 2
    card = (tmp_path / "README.md").read_text()
    assert "training stopped at step 4, before the transition's end (step 100)" in card


def test_no_warning_when_the_transition_fits(tmp_path):
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=4), max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VConWarning)
        trainer.train()


# --------------------------------------------------------------------------------------------------- model card
def card_of(text: str) -> tuple[dict, str]:
    _, metadata, body = text.split("---\n", 2)
    return yaml.safe_load(metadata), body


def test_card_takes_the_trainer_fields_budget_usage_and_comparison(tmp_path):
    trainer = make_trainer(tmp_path, VConConfig(method="prune", sparsity=0.5, transition_steps=4), max_steps=8,
                           eval_strategy="steps", eval_steps=4, gradient_accumulation_steps=2)
    trainer.train()
    trainer.save_model()
    comparison = "| arm | eval_accuracy |\n|---|---|\n| dense | 0.9 |"
    trainer.create_model_card(finetuned_from="google-bert/bert-base-uncased", tasks="text-classification",
                              dataset_tags="nyu-mll/glue", dataset="GLUE SST2", dataset_args="sst2", language="en",
                              license="apache-2.0", comparison=comparison)
    metadata, body = card_of((tmp_path / "README.md").read_text())
    assert metadata["base_model"] == "google-bert/bert-base-uncased"
    assert metadata["pipeline_tag"] == "text-classification" and metadata["datasets"] == ["nyu-mll/glue"]
    assert metadata["language"] == "en" and metadata["license"] == "apache-2.0" and "prune" in metadata["tags"]
    assert "from transformers import AutoModelForSequenceClassification" in body
    assert "| base model | google-bert/bert-base-uncased |" in body
    assert "| dataset | GLUE SST2 (sst2) |" in body and "| optimizer steps | 8 (" in body
    assert "| batch | 8 (4 per device × 2 accumulation × 1 process) |" in body
    assert re.search(r"\| learning rate \| 0.001, linear schedule, adamw_torch\w* optimizer \|", body)
    assert "## Comparison" in body and comparison in body
    metric_rows = re.findall(r"^\| (eval_\w+) \|", body, flags=re.MULTILINE)
    assert metric_rows == ["eval_loss"]  # the compressed model's, under its plain name; no runtime rows
    compressed_loss = [entry for entry in trainer.state.log_history if "eval_compressed_loss" in entry][-1]
    assert f"| eval_loss | {compressed_loss['eval_compressed_loss']:.6g} |" in body


def test_card_of_a_post_shot_run_has_no_schedule(tmp_path):
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=0), max_steps=2)
    trainer.train()
    trainer.save_model()
    body = (tmp_path / "README.md").read_text()
    assert "| transition | none: post-shot, compressed from step 0 on (Q = 0) |" in body and "| schedule |" not in body


def test_card_says_when_the_metrics_are_not_the_saved_models(tmp_path):
    """A plain Trainer with VConCallback evaluates the blended model during the transition."""
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=100), Trainer, max_steps=2,
                           eval_strategy="steps", eval_steps=2)
    trainer.train()
    body = (tmp_path / "README.md").read_text()
    assert "this model itself was not evaluated" in body


# ---------------------------------------------------------------------------------------- unmatched exclusions
@pytest.mark.parametrize(
    "kind, exclude, named, suggestion",
    [
        ("bert", ["pooler"], "['bert.pooler']", "'pooler.dense'"),
        ("gpt2", ["attn"], "h.0.attn", "'attn.c_attn'"),
        ("llama", ["gate"], None, "'gate_proj'"),
        ("vit", ["classifer"], None, "'classifier'"),
    ],
)
def test_an_exclusion_that_matches_no_linear_warns_with_close_names(kind, exclude, named, suggestion):
    with pytest.warns(VConWarning, match=f"exclude_modules entry {exclude[0]!r} excludes nothing") as caught:
        model = apply_vcon(build(kind), VConConfig(method="binary", exclude_modules=exclude))
    message = str(caught[0].message)
    assert suggestion in message and (named is None or named in message), message
    assert model.vcon_state.targeted_module_names  # a warning, not an error


def test_an_exclusion_that_matches_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", VConWarning)
        model = apply_vcon(tiny_bert(), VConConfig(method="binary", exclude_modules=["pooler.dense"]))
    assert "bert.pooler.dense" not in model.vcon_state.targeted_module_names
