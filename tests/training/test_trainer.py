"""VConTrainer and VConCallback on tiny in-test models: β per optimizer step, resume, export, card, Hub upload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from conftest import METHOD_CASES, TinyTextDataset, tiny_bert, vcon_config
from hf_vcon.training.resume import FROZEN_STATES_NAME
from hf_vcon import (
    IncompatibleCheckpointError,
    NoTargetModulesError,
    VConCallback,
    VConConfig,
    VConError,
    VConTrainer,
    VConWarning,
    beta_at,
    get_beta,
    get_vcon_state,
    merge_and_unload,
    set_beta,
)

def training_args(output_dir, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), max_steps=8, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def make_trainer(output_dir, config: VConConfig, trainer_class=VConTrainer, seed: int = 0, **arg_overrides):
    torch.manual_seed(seed)
    model = tiny_bert()
    kwargs = dict(model=model, args=training_args(output_dir, **arg_overrides), train_dataset=TinyTextDataset(),
                  eval_dataset=TinyTextDataset(16, seed=1))
    if trainer_class is VConTrainer:
        return VConTrainer(vcon_config=config, **kwargs)
    return trainer_class(callbacks=[VConCallback(config)], **kwargs)


class BetaRecorder:
    """Wraps compute_loss to record (global_step, β) for every micro-batch."""

    def __init__(self, trainer):
        self.records = []
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            self.records.append((trainer.state.global_step, get_beta(trainer.model)))
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss


# ------------------------------------------------------------------------------------ 1. β per step
@pytest.mark.parametrize("trainer_class", [VConTrainer, Trainer], ids=["VConTrainer", "VConCallback"])
@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("transition_steps", [5, 0.5, 0])
def test_beta_follows_optimizer_steps(tmp_path, trainer_class, accumulation, transition_steps):
    config = VConConfig(method="binary", transition_steps=transition_steps)
    trainer = make_trainer(tmp_path, config, trainer_class, gradient_accumulation_steps=accumulation,
                           per_device_train_batch_size=2)
    recorder = BetaRecorder(trainer)
    trainer.train()

    q = config.resolve_transition_steps(8)
    assert len(recorder.records) == 8 * accumulation
    steps = [step for step, _ in recorder.records]
    assert steps == [t for t in range(8) for _ in range(accumulation)]  # constant within a window
    for step, beta in recorder.records:
        assert beta == pytest.approx(max(1 - step / q, 0) if q else 0.0, abs=1e-12)
        if step >= q:
            assert beta == 0.0
    logged = [entry["vcon/beta"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1] == 0.0 and "vcon/bits" in trainer.state.log_history[0]


# --------------------------------------------------------------------------------------- 2. resume
@pytest.mark.parametrize("method, setting", METHOD_CASES + [
    # the input observers of static scales are in the state dict: a resumed run continues with them exactly
    pytest.param("quant", {"scheme": "FP8"}, id="quant-fp8-static-inputs")])
def test_resume_mid_transition_equals_uninterrupted_run(tmp_path, method, setting):
    config = vcon_config(method, setting, transition_steps=6)
    full = make_trainer(tmp_path / "full", config, save_strategy="steps", save_steps=4)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "vcon_config.json").is_file()
    saved_step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 0 < beta_at(saved_step, config.resolve_transition_steps(8)) < 1  # the checkpoint is mid-transition

    resumed = make_trainer(tmp_path / "resumed", config, seed=123)  # other init: the checkpoint must overwrite it
    recorder = BetaRecorder(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert recorder.records[0] == (4, pytest.approx(1 - 4 / 6))
    assert get_beta(resumed.model) == get_beta(full.model) == 0.0
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("trainer_class", [VConTrainer, Trainer], ids=["VConTrainer", "VConCallback"])
@pytest.mark.parametrize("method, setting", [("prune", {"sparsity": 0.5}), ("binary", {})])
def test_resume_mid_window_of_recompute_every_equals_uninterrupted_run(tmp_path, method, setting, trainer_class):
    """With recompute_every = 3 the checkpoint of step 4 falls inside the window of steps 3-5: the resumed run holds
    the states computed from W of step 3, which the checkpoint keeps, and ends where the uninterrupted run ends."""
    config = vcon_config(method, setting, transition_steps=6, recompute_every=3)
    full = make_trainer(tmp_path / "full", config, trainer_class, save_strategy="steps", save_steps=4)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / FROZEN_STATES_NAME).is_file()
    if trainer_class is Trainer:  # a plain Trainer does not tell callbacks where it resumes from: resume in place
        shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-4")
        checkpoint = tmp_path / "resumed" / "checkpoint-4"
    resumed = make_trainer(tmp_path / "resumed", config, trainer_class, seed=123)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)


def test_resume_from_a_checkpoint_without_vcon_raises(tmp_path):
    plain = Trainer(model=tiny_bert(), args=training_args(tmp_path / "plain", save_strategy="steps", save_steps=2,
                                                          max_steps=2), train_dataset=TinyTextDataset())
    plain.train()
    trainer = make_trainer(tmp_path / "vcon", VConConfig(method="binary", transition_steps=4))
    with pytest.raises(IncompatibleCheckpointError, match="has no vcon_config.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
    assert trainer.state.global_step == 0


def test_resume_with_another_config_or_missing_tensors_raises(tmp_path):
    source = make_trainer(tmp_path / "a", VConConfig(method="lowrank", rank=4, transition_steps=4),
                          save_strategy="steps", save_steps=2, max_steps=2)
    source.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    other = make_trainer(tmp_path / "b", VConConfig(method="lowrank", rank=2, transition_steps=4))
    with pytest.raises(IncompatibleCheckpointError, match=r"rank: checkpoint 4 vs now 2"):
        other.train(resume_from_checkpoint=str(checkpoint))

    weights = load_file(checkpoint / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("vcon_A"))
    del weights[dropped]
    from safetensors.torch import save_file

    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    same = make_trainer(tmp_path / "c", VConConfig(method="lowrank", rank=4, transition_steps=4))
    with pytest.raises(IncompatibleCheckpointError, match=rf"1 missing \(e.g. \['{dropped}'\]\)"):
        same.train(resume_from_checkpoint=str(checkpoint))


# ---------------------------------------------------------------------------------- 3. save_model
@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_save_model_writes_a_plain_checkpoint_of_the_compressed_model(tmp_path, method, setting):
    config = vcon_config(method, setting, transition_steps=4)
    trainer = make_trainer(tmp_path, config, eval_strategy="steps", eval_steps=4)
    trainer.train()
    metrics = trainer.evaluate()
    assert get_beta(trainer.model) == 0.0 and metrics["eval_compressed_loss"] == metrics["eval_loss"]
    trainer.save_model()

    inputs = TinyTextDataset(4, seed=5).input_ids
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=inputs).logits
    # binary and quant are saved as compressed-tensors, which transformers 4.x would load in float16 by default
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, expected, atol=1e-5, rtol=0)
    assert get_vcon_state(trainer.model) is not None  # training state untouched: the export is a copy

    saved = json.loads((tmp_path / "vcon_config.json").read_text())
    assert saved["method"] == method and saved["transition_steps"] == 4 and "hf_vcon_version" in saved
    card = (tmp_path / "README.md").read_text()
    for needle in ("hf_vcon", "- vcon", f"- {method}", "| method |", "| transition Q | 4 (4 optimizer steps) |",
                   "| schedule | linear", "parameters of targeted layers", "bytes of targeted layers",
                   f"| eval_loss | {metrics['eval_loss']:.6g} |", "transformers", "PyTorch"):
        assert needle in card, needle
    assert trainer.vcon_summary.settings and all(setting in card for setting in trainer.vcon_summary.settings)
    assert trainer.vcon_summary.table() in card  # the layers per setting, with their sizes


def test_saved_model_loads_without_hf_vcon(tmp_path):
    trainer = make_trainer(tmp_path, VConConfig(method="prune", sparsity=0.75, transition_steps=2), max_steps=3)
    trainer.train()
    trainer.save_model()
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r})\n"
        "assert 'hf_vcon' not in sys.modules\n"
        "w = model.bert.encoder.layer[0].attention.self.query.weight\n"
        "print(int((w == 0).sum()), w.numel())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    zeros, total = map(int, result.stdout.split()[-2:])
    assert zeros == round(total * 0.75)


def test_saving_mid_transition_warns(tmp_path):
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=100), max_steps=2)
    trainer.train()
    with pytest.warns(VConWarning, match="while β = 0.98 > 0"):
        trainer.save_model()


def test_evaluate_reports_the_compressed_model_during_the_transition(tmp_path):
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=100), max_steps=2)
    trainer.train()
    beta = get_beta(trainer.model)
    metrics = trainer.evaluate()
    assert 0 < beta == get_beta(trainer.model)  # restored
    assert {"eval_loss", "eval_compressed_loss"} <= metrics.keys()
    with torch.no_grad():
        set_beta(trainer.model, 0.0)
        compressed_only = trainer.evaluate()["eval_loss"]
    assert metrics["eval_compressed_loss"] == pytest.approx(compressed_only, rel=1e-6)
    assert metrics["eval_compressed_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-6)


# ------------------------------------------------------------------------------- 4. VConCallback
def test_callback_on_a_plain_trainer_trains_and_exports_as_vcon_trainer_does(tmp_path):
    """The callback's export policy is VConTrainer's: checkpoints get vcon_config.json, and train() ends by writing
    the merged compressed model (with its configs and card) to output_dir."""
    config = VConConfig(method="lowrank", rank=4, transition_steps=3)
    trainer = make_trainer(tmp_path, config, trainer_class=Trainer, max_steps=4, save_strategy="steps", save_steps=2)
    assert get_vcon_state(trainer.model) is not None  # patched at the end of Trainer.__init__
    factors = {name for name, _ in trainer.model.named_parameters() if "vcon_" in name}
    trainer.train()
    optimised = {name for name, p in trainer.model.named_parameters() if p in trainer.optimizer.state}
    assert factors and factors <= optimised

    assert (tmp_path / "checkpoint-2" / "vcon_config.json").is_file()
    assert {"model.safetensors", "config.json", "vcon_config.json", "README.md", "training_args.bin"} <= {
        path.name for path in tmp_path.iterdir()}
    inputs = TinyTextDataset(4, seed=5).input_ids
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=inputs).logits
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merge_and_unload(trainer.model)(input_ids=inputs).logits, expected, atol=1e-5, rtol=0)
    assert "| method | lowrank |" in (tmp_path / "README.md").read_text()


def test_callback_export_can_be_turned_off(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=2), train_dataset=TinyTextDataset(),
                      callbacks=[VConCallback(VConConfig(method="binary"), export_at_train_end=False)])
    trainer.train()
    assert not (tmp_path / "model.safetensors").exists()


def test_callback_added_too_late_is_a_clear_error(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=TinyTextDataset())
    trainer.add_callback(VConCallback(VConConfig(method="binary")))
    with pytest.raises(VConError, match="added after the Trainer was built"):
        trainer.train()


# ------------------------------------------------------------------------- 5. gradient checkpointing
def _losses(trainer):
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("method, setting", METHOD_CASES)
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches(tmp_path, method, setting, reentrant):
    config = vcon_config(method, setting, transition_steps=3)
    reference = _losses(make_trainer(tmp_path / "ref", config, max_steps=5))
    trainer = make_trainer(tmp_path / "gc", config, max_steps=5, gradient_checkpointing=True,
                           gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = _losses(trainer)
    encoder_layer = trainer.model.bert.encoder.layer[0]
    assert getattr(encoder_layer, "gradient_checkpointing", False) or trainer.model.bert.encoder.gradient_checkpointing
    assert checkpointed == pytest.approx(reference, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------- 6. bad config
@pytest.mark.parametrize(
    "config, error, message",
    [
        (VConConfig(method="lowrank", rank=64), ValueError, r"rank=64 gives rank 64 for layer"),
        (VConConfig(method="binary", target_modules=["nothing"]), NoTargetModulesError, "matched no"),
        ({"method": "binary"}, TypeError, "vcon_config must be a VConConfig"),
    ],
    ids=["rank", "no-match", "dict"],
)
def test_bad_config_fails_in_init(tmp_path, config, error, message):
    with pytest.raises(error, match=message):
        VConTrainer(model=tiny_bert(), args=training_args(tmp_path), vcon_config=config, train_dataset=TinyTextDataset())
    assert not any(tmp_path.iterdir())


def test_conflicting_configs_are_an_error(tmp_path):
    from hf_vcon import apply_vcon

    model = apply_vcon(tiny_bert(), VConConfig(method="binary"))
    with pytest.raises(ValueError, match="differs from the config the model was patched with"):
        VConTrainer(model=model, args=training_args(tmp_path), vcon_config=VConConfig(method="prune"))


# ---------------------------------------------------------------------------------- push_to_hub
@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the Hub calls at the huggingface_hub boundary; record the uploads."""
    import huggingface_hub
    import transformers.trainer as trainer_module

    uploads = []

    class RepoUrl(str):
        repo_id = "user/tiny-vcon"

    def create_repo(*args, **kwargs):
        return RepoUrl("https://huggingface.co/user/tiny-vcon")

    def upload_folder(*args, **kwargs):
        uploads.append(kwargs)
        if fake_hub_state["fail"]:
            raise ConnectionError("network is unreachable")
        return "commit-info"

    fake_hub_state = {"fail": False}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: create_repo(*a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, *a, **k: upload_folder(*a, **k))
    for name, replacement in (("create_repo", create_repo), ("upload_folder", upload_folder)):
        if hasattr(trainer_module, name):  # transformers 4.x binds these names at import
            monkeypatch.setattr(trainer_module, name, replacement)
    return uploads, fake_hub_state


def test_push_to_hub_uploads_the_merged_folder_with_its_card(tmp_path, fake_hub):
    uploads, _ = fake_hub
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=2), max_steps=3, push_to_hub=True,
                           hub_model_id="user/tiny-vcon", save_strategy="steps", save_steps=3)
    trainer.train()
    trainer.push_to_hub()
    assert uploads and uploads[-1]["folder_path"] == str(tmp_path)
    assert "checkpoint-*" in uploads[-1]["ignore_patterns"]
    weights = load_file(tmp_path / "model.safetensors")
    assert not any("base_layer" in key or "vcon_" in key for key in weights)
    card = (tmp_path / "README.md").read_text()
    assert "- binary" in card and "| method | binary |" in card


def test_failed_upload_keeps_the_local_folder_and_says_what_failed(tmp_path, fake_hub):
    uploads, state = fake_hub
    trainer = make_trainer(tmp_path, VConConfig(method="binary", transition_steps=2), max_steps=3,
                           hub_model_id="user/tiny-vcon")
    trainer.train()
    trainer.save_model()
    before = {path: (tmp_path / path).read_bytes() for path in ("model.safetensors", "config.json", "vcon_config.json")}
    state["fail"] = True
    with pytest.raises(VConError, match=r"Uploading .* to the Hub repo 'user/tiny-vcon' failed \(ConnectionError: network"):
        trainer.push_to_hub()
    assert all((tmp_path / path).read_bytes() == data for path, data in before.items())


# ------------------------------------------------------------------------------- compact + release
def test_trainer_releases_the_low_rank_dense_path_and_saves_compact(tmp_path):
    from hf_vcon import load_compressed

    trainer = make_trainer(tmp_path, VConConfig(method="lowrank", rank=4, transition_steps=3), max_steps=6)
    trainer.train()
    layers = get_vcon_state(trainer.model).layers
    assert all(layer.dense_released and not layer.weight.requires_grad for layer in layers)
    assert not any(layer.weight in trainer.optimizer.state for layer in layers)

    folder = trainer.save_compressed(str(tmp_path / "compact"))
    trainer.save_model(str(tmp_path / "merged"))
    inputs = TinyTextDataset(4, seed=5).input_ids
    with torch.no_grad():
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(input_ids=inputs).logits
        compact = load_compressed(folder).eval()(input_ids=inputs).logits
    torch.testing.assert_close(compact, merged, atol=1e-5, rtol=0)


def test_release_does_not_change_training_of_the_compressed_path(tmp_path):
    config = VConConfig(method="lowrank", rank=4, transition_steps=2)
    released = make_trainer(tmp_path / "a", config, max_steps=5)
    released.train()
    kept = make_trainer(tmp_path / "b", config, max_steps=5)
    kept.vcon_callback._released = True  # never release
    kept.callback_handler.callbacks[0].on_train_begin = _keep_released(kept.vcon_callback)
    kept.train()
    for key, value in released.model.state_dict().items():
        if "vcon_" in key or "base_layer" not in key:  # factors and untouched tensors train identically
            torch.testing.assert_close(value, kept.model.state_dict()[key], atol=1e-6, rtol=0, msg=key)


def _keep_released(callback):
    original = callback.on_train_begin

    def on_train_begin(*args, **kwargs):
        result = original(*args, **kwargs)
        callback._released = True
        return result

    return on_train_begin


class TinyImageDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": torch.tensor(index % 10)}


def test_resume_of_a_model_transformers_saves_under_legacy_names(tmp_path):
    """transformers 5 writes ViT checkpoints under its legacy key names and its resume does not rename them back (the
    model would stay as it was); VConTrainer renames them, so resuming mid-transition gives the uninterrupted run."""
    from conftest import tiny_vit

    def trainer(folder, seed):
        torch.manual_seed(seed)
        args = training_args(folder, max_steps=4, save_strategy="steps", save_steps=2)
        return VConTrainer(model=tiny_vit(), args=args, train_dataset=TinyImageDataset(),
                           vcon_config=VConConfig(method="binary", transition_steps=3))

    full = trainer(tmp_path / "full", 0)
    full.train()
    resumed = trainer(tmp_path / "resumed", 7)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
