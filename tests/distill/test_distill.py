"""Distillation: the KD loss against an independent reference, the trainer's loss against the formula, α = 0 equal to a
run without distillation bit for bit, a teacher that never changes, gradient accumulation, resume, cached logits,
block-wise VCON, the mixin on a plain Trainer, and the errors."""

from __future__ import annotations

import copy
import json
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer, TrainingArguments

from conftest import TinyTextDataset, build, tiny_bert, tiny_llama
from hf_vcon import (
    DistillationConfig,
    DistillationMixin,
    IncompatibleCheckpointError,
    VConBlock,
    VConCallback,
    VConConfig,
    VConError,
    VConLinear,
    VConTrainer,
    VConWarning,
    add_teacher_index,
    apply_vcon,
    cache_teacher_logits,
    kd_loss,
)
from hf_vcon.distill import losses as losses_module
from hf_vcon.distill.losses import distill_mask, hidden_state_loss


# ------------------------------------------------------------------------------------------------ references
def reference_kd(student: np.ndarray, teacher: np.ndarray, temperature: float, mask=None) -> float:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), per item, mean over kept items: float64, by hand."""
    def log_softmax(z):
        z = z / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_t, log_s = log_softmax(teacher.astype(np.float64)), log_softmax(student.astype(np.float64))
    per_item = (np.exp(log_t) * (log_t - log_s)).sum(-1) * temperature**2
    if mask is not None:
        per_item = per_item[mask]
    return float(per_item.reshape(-1).mean())


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_kd_loss_equals_the_reference(temperature):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=generator) * 3, torch.randn(6, 5, generator=generator) * 3
    expected = reference_kd(student.numpy(), teacher.numpy(), temperature)
    assert float(kd_loss(student, teacher, temperature)) == pytest.approx(expected, rel=1e-6)
    tokens_s, tokens_t = torch.randn(2, 7, 11, generator=generator), torch.randn(2, 7, 11, generator=generator)
    mask = torch.rand(2, 7, generator=generator) > 0.4
    expected = reference_kd(tokens_s.numpy(), tokens_t.numpy(), temperature, mask.numpy())
    assert float(kd_loss(tokens_s, tokens_t, temperature, mask)) == pytest.approx(expected, rel=1e-6)
    total = kd_loss(tokens_s, tokens_t, temperature, mask, reduction="sum")
    assert float(total) == pytest.approx(expected * int(mask.sum()), rel=1e-6)
    # bf16 logits are computed in float32; identical distributions give exactly 0
    assert kd_loss(student.bfloat16(), student.bfloat16(), temperature).dtype == torch.float32
    assert float(kd_loss(student, student, temperature)) == 0.0


def test_kd_loss_with_classes_the_teacher_rules_out_is_finite_and_has_finite_gradients():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.tensor([[2.0, -float("inf"), 0.5, 0.0]] * 3)
    loss = kd_loss(student, teacher, 2.0)
    loss.backward()
    expected = reference_kd(student.detach().numpy(), np.where(np.isinf(teacher.numpy()), -1e30, teacher.numpy()), 2.0)
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("shape", [(3, 40, 50), (130, 7), (1, 1, 9)], ids=["tokens", "examples", "one-item"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_in_chunks_equals_the_float64_computation_value_and_gradient(shape, temperature):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(shape, generator=generator) * 3, torch.randn(shape, generator=generator) * 3
    mask = torch.rand(shape[:-1], generator=generator) > 0.3
    mask.view(-1)[0] = True
    weights = torch.rand(shape[:-1], generator=generator)  # a gradient that differs per item

    def loss_and_grad(dtype):
        leaf = student.clone().to(dtype).requires_grad_()
        per_item = kd_loss(leaf, teacher.to(dtype), temperature, mask, reduction="none")
        value = kd_loss(leaf, teacher.to(dtype), temperature, mask)
        ((per_item * weights.to(per_item.dtype)).sum() + value).backward()
        return per_item.detach().double(), value.detach().double(), leaf.grad.double()

    if mask.numel() > 8:  # many chunks: the slices of one chunk must not leak into another
        assert len(losses_module._chunks(mask.numel(), shape[-1])) > 1
    per_item, value, grad = loss_and_grad(torch.float32)
    log_t = F.log_softmax(teacher.double() / temperature, -1)
    leaf = student.double().requires_grad_()
    expected = (log_t.exp() * (log_t - F.log_softmax(leaf / temperature, -1))).sum(-1) * temperature**2
    expected = torch.where(mask, expected, 0.0)
    ((expected * weights.double()).sum() + expected.sum() / mask.sum()).backward()
    torch.testing.assert_close(per_item, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value, expected.detach().sum() / mask.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, leaf.grad, atol=1e-5, rtol=1e-5)
    bf16_grad = loss_and_grad(torch.bfloat16)[2]
    assert torch.isfinite(bf16_grad).all() and (bf16_grad - leaf.grad).abs().max() < 0.05 * leaf.grad.abs().max() + 1e-3


def test_kd_loss_keeps_gradients_for_a_teacher_that_trains():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 6, generator=generator).requires_grad_()
    teacher = torch.randn(4, 6, generator=generator).requires_grad_()
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


class PeakMemory(TorchDispatchMode):
    """Bytes of the tensor storages that ops allocate while active (CPU included), and their peak; storages of
    ``known`` tensors (inputs that exist anyway) are not counted."""

    def __init__(self, *known: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self.seen = {tensor.untyped_storage()._cdata for tensor in known}

    def _free(self, key, size):
        self.seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in self.seen:
                    self.seen.add(storage._cdata)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, storage._cdata, storage.nbytes())
        return out


def test_kd_loss_peak_memory_is_at_most_two_logits_tensors_beyond_the_task_loss():
    batch, tokens, vocab = 4, 64, 2048
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, tokens, vocab, generator=generator)
    teacher = torch.randn(batch, tokens, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, tokens), generator=generator)
    one_tensor = logits.numel() * 4

    def peak(distill: bool) -> int:
        student = logits.clone().requires_grad_()
        with PeakMemory(student, teacher, labels) as memory:
            loss = F.cross_entropy(student.view(-1, vocab), labels.view(-1))
            if distill:
                loss = 0.5 * loss + 0.5 * kd_loss(student, teacher, 2.0)
            loss.backward()
        return memory.peak

    task, both = peak(False), peak(True)
    assert task >= 2 * one_tensor  # the tracker sees the task loss's own logits-sized tensors
    assert both - task <= 2 * one_tensor, (both - task) / one_tensor


def test_distill_mask_shifts_for_causal_language_models():
    labels = torch.tensor([[-100, 5, 6, -100, 7]])
    logits = torch.zeros(1, 5, 9)
    assert distill_mask(logits, labels, shifts_labels=True).tolist() == [[True, True, False, True, False]]
    assert distill_mask(logits, labels, shifts_labels=False).tolist() == [[False, True, True, False, True]]
    shift = torch.tensor([[1, -100, 2, 3, -100]])
    assert distill_mask(logits, labels, True, shift_labels=shift).tolist() == [[True, False, True, True, False]]
    assert distill_mask(torch.zeros(2, 3), torch.tensor([0, -100]), False) is None  # every example, labelled or not
    attention = torch.tensor([[0, 1, 1, 1, 1]])
    assert distill_mask(logits, None, True, attention_mask=attention).tolist() == [[False, True, True, True, True]]


def test_hidden_state_loss_equals_the_reference():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    s, t, m = student.double().numpy(), teacher.double().numpy(), mask.numpy()
    mse = ((s - t) ** 2).mean(-1)[m].mean()
    cosine = (1 - (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1))[m].mean()
    assert float(hidden_state_loss(student, teacher, "mse", mask)) == pytest.approx(mse, rel=1e-6)
    assert float(hidden_state_loss(student, teacher, "cosine", mask)) == pytest.approx(cosine, rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=1.5), r"alpha=1.5 must be in \[0, 1\]"),
    (dict(temperature=0), r"temperature=0 must be in > 0"),
    (dict(hidden_loss="l1"), r"hidden_loss='l1' is not known; use one of cosine, mse"),
    (dict(teacher_dtype="int8"), r"teacher_dtype='int8' is not supported; use one of float32, bfloat16, float16"),
    (dict(hidden_layers=[1, "x"]), r"hidden_layers entry 'x' must be an int"),
    (dict(teacher_logits="/no/such/file.safetensors"), r"teacher_logits='/no/such/file.safetensors' does not exist"),
    (dict(teacher_device="gpu:x"), r"teacher_device='gpu:x' is not a device"),
])
def test_bad_settings_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(**kwargs)


def test_a_teacher_path_is_refused_with_how_to_load_it():
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        DistillationConfig(teacher="bert-base-uncased")


# -------------------------------------------------------------------------------------------------- trainer
def args_for(output_dir, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
                  dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


def vcon_trainer(output_dir, distillation=None, config=None, model=None, dataset=None, eval_dataset=None,
                 **overrides) -> VConTrainer:
    torch.manual_seed(0)
    model = model if model is not None else tiny_bert()
    config = config or VConConfig(method="prune", sparsity=0.5, transition_steps=3)
    kwargs = {} if distillation is None else {"distillation": distillation}
    return VConTrainer(model=model, args=args_for(output_dir, **overrides), vcon_config=config,
                       train_dataset=dataset if dataset is not None else TinyTextDataset(), eval_dataset=eval_dataset,
                       **kwargs)


def batch_of(dataset, count: int = 4) -> dict:
    return {key: torch.stack([dataset[i][key] for i in range(count)]) for key in dataset[0]}


def tensors(model) -> dict:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_alpha_zero_reproduces_the_run_without_distillation_bit_for_bit(tmp_path):
    plain = vcon_trainer(tmp_path / "plain")
    plain.train()
    distilled = vcon_trainer(tmp_path / "alpha0", DistillationConfig(alpha=0.0, temperature=2.0))
    distilled.train()
    kd = [entry["distill/kd_loss"] for entry in distilled.state.log_history if "distill/kd_loss" in entry]
    assert len(kd) == 6 and kd[0] == 0.0 and max(kd) > 0  # the teacher ran, and the student moved away from it
    expected, actual = tensors(plain.model), tensors(distilled.model)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    losses = [[entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
              for trainer in (plain, distilled)]
    assert losses[0] == losses[1]


def test_the_teacher_is_a_frozen_copy_that_never_changes(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    original = tensors(model)
    trainer = vcon_trainer(tmp_path, DistillationConfig(alpha=0.7), model=model,
                           eval_dataset=TinyTextDataset(8, seed=1), eval_strategy="steps", eval_steps=3)
    teacher = trainer.teacher
    assert not any(isinstance(module, VConLinear) for module in teacher.modules())  # copied before patching
    student_storage = {p.data_ptr() for p in trainer.model.parameters()}
    assert not student_storage & {p.data_ptr() for p in teacher.parameters()}  # never a view of trained weights
    trainer.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    after = teacher.state_dict()
    assert after.keys() == original.keys() and all(torch.equal(after[key], original[key]) for key in original)
    assert not torch.equal(trainer.model.bert.embeddings.word_embeddings.weight, original[
        "bert.embeddings.word_embeddings.weight"])  # the student trained


def test_training_loss_is_the_formula_for_a_classifier(tmp_path):
    teacher = build("bert", seed=1)
    with torch.no_grad():
        teacher.classifier.weight.mul_(100)  # confident logits: a random head's are all near 0
    config = DistillationConfig(alpha=0.3, temperature=2.0, teacher=teacher, hidden_layers=[1, (2, 2)],
                                hidden_loss="cosine", hidden_weight=0.5)
    trainer = vcon_trainer(tmp_path, config, config=VConConfig(method="prune", sparsity=0.5, transition_steps=0))
    trainer.vcon_callback.update(0, 6)  # β = 0: the student is compressed, so it differs from any teacher
    batch = batch_of(TinyTextDataset())
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        student = trainer.model(**batch, output_hidden_states=True)
        target = teacher(input_ids=batch["input_ids"], output_hidden_states=True)
    task = F.cross_entropy(student.logits, batch["labels"])
    kd = reference_kd(student.logits.numpy(), target.logits.numpy(), 2.0)
    hidden = np.mean([float(hidden_state_loss(student.hidden_states[i], target.hidden_states[i], "cosine"))
                      for i in (1, 2)])
    assert float(loss) == pytest.approx(0.7 * float(task) + 0.3 * kd + 0.5 * hidden, rel=1e-5)
    assert kd > 0.01 and hidden > 0.01


def causal_batch(size: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 99, (size, 8), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand(size, 8, generator=generator) < 0.35] = -100  # a different number of targets per sequence
    return {"input_ids": input_ids, "labels": labels}


class CausalDataset(torch.utils.data.Dataset):
    def __init__(self, size: int = 16, seed: int = 0):
        self.batch = causal_batch(size, seed)

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.batch.items()}


@pytest.mark.parametrize("num_items", [None, "counted"])
def test_training_loss_is_the_formula_per_token_for_a_causal_lm(tmp_path, num_items):
    teacher = build("llama", seed=1)
    trainer = vcon_trainer(tmp_path, DistillationConfig(alpha=0.6, temperature=1.5, teacher=teacher),
                           model=tiny_llama(), config=VConConfig(method="binary", transition_steps=0), dataset=CausalDataset())
    trainer.vcon_callback.update(0, 6)
    batch = causal_batch()
    trainer.model.train()
    count = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(trainer.model, dict(batch),
                                num_items_in_batch=None if num_items is None else torch.tensor(count))
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"]).logits
        target = teacher(input_ids=batch["input_ids"]).logits
    keep = (batch["labels"][:, 1:] != -100).numpy()  # logits at t predict token t + 1
    per_token_ce = F.cross_entropy(student[:, :-1].reshape(-1, 99), batch["labels"][:, 1:].reshape(-1),
                                   reduction="none")
    task = float(per_token_ce.sum()) / count
    kd = reference_kd(student[:, :-1].numpy(), target[:, :-1].numpy(), 1.5, keep)
    assert float(loss) == pytest.approx(0.4 * task + 0.6 * kd, rel=1e-5)


def _trained(tmp_path, name, accumulation, batch, model_builder, dataset, alpha):
    teacher = build("llama" if model_builder is tiny_llama else "bert", seed=1)
    trainer = vcon_trainer(tmp_path / name, DistillationConfig(alpha=alpha, teacher=teacher), model=model_builder(),
                           config=VConConfig(method="prune", sparsity=0.5, transition_steps=0), dataset=dataset,
                           max_steps=3, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                           optim="sgd", learning_rate=0.5)  # SGD: a gradient twice too large shows (Adam hides it)
    trainer.train()
    return tensors(trainer.model), trainer


@pytest.mark.parametrize("model_builder, alpha", [(tiny_llama, 0.5), (tiny_bert, 1.0)], ids=["llama", "bert-pure-kd"])
def test_gradient_accumulation_optimises_the_same_loss(tmp_path, model_builder, alpha):
    """Two micro-batches of 2 make the same update as one batch of 4 (per-token targets differ in number between
    sequences, so a mean of micro-batch means would not). BERT's task loss is left out (alpha = 1): transformers 5
    hands num_items_in_batch to its classifier, whose loss ignores it."""
    dataset = CausalDataset() if model_builder is tiny_llama else TinyTextDataset()
    whole, _ = _trained(tmp_path, "whole", 1, 4, model_builder, dataset, alpha)
    accumulated, trainer = _trained(tmp_path, "accumulated", 2, 2, model_builder, dataset, alpha)
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], atol=2e-6, rtol=0, msg=key)
    first = next(entry for entry in trainer.state.log_history if "distill/kd_loss" in entry)
    assert first["distill/kd_loss"] > 0


def test_resume_rebuilds_the_same_teacher_and_continues_the_run(tmp_path):
    config = DistillationConfig(alpha=0.5, temperature=2.0)
    vcon = VConConfig(method="prune", sparsity=0.5, transition_steps=6)
    full = vcon_trainer(tmp_path / "full", config, config=vcon, max_steps=8, save_strategy="steps", save_steps=4)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    record = json.loads((checkpoint / "vcon_distillation.json").read_text())
    assert record["distillation"]["alpha"] == 0.5 and record["teacher_fingerprint"]
    resumed = vcon_trainer(tmp_path / "resumed", config, config=vcon, max_steps=8)  # the same model as given
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, actual = tensors(full.model), tensors(resumed.model)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)

    torch.manual_seed(123)
    other_teacher = vcon_trainer(tmp_path / "other", config, config=vcon, model=tiny_bert(), max_steps=8)
    with pytest.raises(IncompatibleCheckpointError, match="teacher of this run is not the one"):
        other_teacher.train(resume_from_checkpoint=str(checkpoint))
    other_alpha = vcon_trainer(tmp_path / "alpha", DistillationConfig(alpha=0.9), config=vcon, max_steps=8)
    with pytest.raises(IncompatibleCheckpointError, match="alpha: checkpoint 0.5 vs now 0.9"):
        other_alpha.train(resume_from_checkpoint=str(checkpoint))
    without = vcon_trainer(tmp_path / "without", None, config=vcon, max_steps=8)
    with pytest.raises(IncompatibleCheckpointError, match="was trained with distillation"):
        without.train(resume_from_checkpoint=str(checkpoint))
    assert other_teacher.state.global_step == other_alpha.state.global_step == without.state.global_step == 0


# --------------------------------------------------------------------------------------------- cached logits
def test_cached_logits_train_as_the_running_teacher_and_refuse_other_data(tmp_path):
    teacher = build("bert", seed=1)
    dataset = TinyTextDataset()
    path = cache_teacher_logits(teacher, dataset, str(tmp_path / "logits.safetensors"), batch_size=5,
                                dtype=torch.float32)
    with pytest.raises(FileExistsError):
        cache_teacher_logits(teacher, dataset, path)
    running, _ = _vision_free_run(tmp_path / "running", DistillationConfig(alpha=0.8, teacher=teacher), dataset)
    cached, trainer = _vision_free_run(tmp_path / "cached", DistillationConfig(alpha=0.8, teacher_logits=path),
                                       add_teacher_index(dataset))
    assert trainer.teacher is None  # no teacher was built
    for key in running:
        torch.testing.assert_close(cached[key], running[key], atol=1e-5, rtol=0, msg=key)
    other = add_teacher_index(TinyTextDataset(seed=7))
    with pytest.raises(VConError, match="are not those its logits were cached from"):
        _vision_free_run(tmp_path / "other", DistillationConfig(alpha=0.8, teacher_logits=path), other)
    with pytest.raises(VConError, match="has no 'teacher_index'"):
        _vision_free_run(tmp_path / "no-index", DistillationConfig(alpha=0.8, teacher_logits=path), dataset)
    with pytest.raises(VConError, match=r"have 3 logits per row, the student has 5 labels"):  # before training
        vcon_trainer(tmp_path / "other-head", DistillationConfig(alpha=0.8, teacher_logits=path),
                     model=tiny_bert(num_labels=5), dataset=add_teacher_index(dataset))


def _vision_free_run(output_dir, config, dataset):
    trainer = vcon_trainer(output_dir, config, config=VConConfig(method="binary", transition_steps=2), dataset=dataset,
                           max_steps=3)
    trainer.train()
    return tensors(trainer.model), trainer


class PaddedText(torch.utils.data.Dataset):
    """Sequences of 3 to 8 tokens; the collator pads them to the longest of each batch."""

    def __init__(self, size: int = 12):
        generator = torch.Generator().manual_seed(3)
        self.items = [torch.randint(1, 99, (int(n),), generator=generator)
                      for n in torch.randint(3, 9, (size,), generator=generator)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return {"input_ids": self.items[index], "labels": self.items[index]}


def pad_right(examples):
    width = max(len(example["input_ids"]) for example in examples)
    batch = {"input_ids": torch.zeros(len(examples), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
             "labels": torch.full((len(examples), width), -100)}
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n], batch["attention_mask"][row, :n] = example["input_ids"], 1
        batch["labels"][row, :n] = example["labels"]
    if "teacher_index" in examples[0]:
        batch["teacher_index"] = torch.tensor([example["teacher_index"] for example in examples])
    return batch


def test_cached_per_token_logits_with_padding_train_as_the_running_teacher(tmp_path):
    teacher = build("gpt2", seed=1)
    dataset = PaddedText()
    path = cache_teacher_logits(teacher, dataset, str(tmp_path / "lm.safetensors"), data_collator=pad_right,
                                batch_size=5, dtype=torch.float32)  # other batches, other padding than training's
    results = {}
    for name, config, data in (("running", DistillationConfig(alpha=0.5, teacher=teacher), dataset),
                               ("cached", DistillationConfig(alpha=0.5, teacher_logits=path),
                                add_teacher_index(dataset))):
        trainer = VConTrainer(model=build("gpt2").train(), args=args_for(tmp_path / name, max_steps=3),
                              train_dataset=data, data_collator=pad_right, vcon_config=VConConfig(method="binary", transition_steps=0),
                              distillation=config)
        trainer.train()
        results[name] = tensors(trainer.model)
    for key in results["running"]:
        torch.testing.assert_close(results["cached"][key], results["running"][key], atol=1e-5, rtol=0, msg=key)


# ------------------------------------------------------------------------------------ other ways in, errors
@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="block-wise VCON needs transformers >= 5")
def test_block_wise_vcon_distils_from_the_original_blocks(tmp_path):
    config = VConConfig(method="prune", sparsity=0.5, granularity="block", target_blocks=r"bert\.encoder\.layer\.\d+",
                        transition_steps=3)
    trainer = vcon_trainer(tmp_path, DistillationConfig(alpha=0.5, hidden_layers="all"), config=config)
    assert not any(isinstance(module, (VConBlock, VConLinear)) for module in trainer.teacher.modules())
    trainer.train()
    kd = [entry["distill/kd_loss"] for entry in trainer.state.log_history if "distill/kd_loss" in entry]
    assert kd[0] == 0.0 and kd[-1] > 0  # β = 1 at step 0: the student is the teacher, exactly
    with pytest.raises(VConError, match="Under block-wise VCON, modules inside a block"):
        vcon_trainer(tmp_path / "inside", DistillationConfig(hidden_modules=r".*layer\.0\.attention\.output"),
                     config=config)


def test_a_model_patched_beforehand_gives_its_latent_dense_model_as_teacher(tmp_path):
    model = build("bert")
    with torch.no_grad():
        expected = model(input_ids=batch_of(TinyTextDataset())["input_ids"]).logits
    vcon = VConConfig(method="lowrank", rank=4, transition_steps=3)
    apply_vcon(model, vcon)
    trainer = vcon_trainer(tmp_path, DistillationConfig(), model=model, config=vcon)
    assert not any(isinstance(module, VConLinear) for module in trainer.teacher.modules())
    with torch.no_grad():
        actual = trainer.teacher(input_ids=batch_of(TinyTextDataset())["input_ids"]).logits
    assert torch.equal(actual, expected)


def test_a_bfloat16_teacher(tmp_path):
    trainer = vcon_trainer(tmp_path, DistillationConfig(alpha=0.5, teacher_dtype="bf16"), max_steps=2)
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    trainer.train()
    kd = [entry["distill/kd_loss"] for entry in trainer.state.log_history if "distill/kd_loss" in entry]
    assert len(kd) == 2 and all(np.isfinite(kd))


def test_the_copy_keeps_tied_weights_tied_and_casts_as_it_copies():
    from hf_vcon.distill.teacher import frozen_copy

    model = build("gpt2")
    teacher = frozen_copy(model, torch.bfloat16)
    assert teacher.lm_head.weight is teacher.transformer.wte.weight  # tied, as in the model
    assert teacher.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    exact = frozen_copy(model)
    inputs = batch_of(TinyTextDataset())["input_ids"]
    with torch.no_grad():
        assert torch.equal(exact(input_ids=inputs).logits, model(input_ids=inputs).logits)


class DistilTrainer(DistillationMixin, Trainer):
    pass


def test_the_mixin_on_a_plain_trainer_with_the_callback(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    trainer = DistilTrainer(model=model, args=args_for(tmp_path, max_steps=3), train_dataset=TinyTextDataset(),
                            callbacks=[VConCallback(VConConfig(method="binary", transition_steps=0))],
                            distillation=DistillationConfig(alpha=0.5))
    assert any(isinstance(module, VConLinear) for module in trainer.model.modules())  # the callback patched it
    assert not any(isinstance(module, VConLinear) for module in trainer.teacher.modules())  # copied before that
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["distill/kd_loss"] > 0 and logged["vcon/beta"] == 0.0


def test_a_zero3_partitioned_model_cannot_be_copied_as_teacher(tmp_path):
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.weight.ds_id = 0  # what DeepSpeed ZeRO-3 leaves on a partitioned parameter
    with pytest.raises(VConError, match=r"partitioned by DeepSpeed ZeRO-3 \(zero_optimization.stage = 3\)"):
        vcon_trainer(tmp_path, DistillationConfig(), model=model)
    assert not any(isinstance(module, VConLinear) for module in model.modules())  # raised before patching


def test_the_student_itself_is_refused_as_teacher(tmp_path):
    model = tiny_bert()
    with pytest.raises(ValueError, match="shares weights with the model being trained"):
        vcon_trainer(tmp_path, DistillationConfig(teacher=model), model=model)


def test_a_regression_head_is_refused(tmp_path):
    torch.manual_seed(0)
    trainer = vcon_trainer(tmp_path, DistillationConfig(), model=tiny_bert(num_labels=1), max_steps=1)
    with pytest.raises(VConError, match="needs class logits"):
        trainer.compute_loss(trainer.model.train(), {"input_ids": batch_of(TinyTextDataset())["input_ids"],
                                                     "labels": torch.zeros(4)})


def test_evaluation_reports_the_task_loss(tmp_path):
    teacher = build("bert", seed=1)
    trainer = vcon_trainer(tmp_path, DistillationConfig(alpha=0.9, teacher=teacher),
                           config=VConConfig(method="binary", transition_steps=0))
    plain = vcon_trainer(tmp_path / "plain", config=VConConfig(method="binary", transition_steps=0))
    evaluation = TinyTextDataset(8, seed=1)
    assert trainer.evaluate(evaluation)["eval_loss"] == plain.evaluate(evaluation)["eval_loss"]


# ------------------------------------------------------------------------------ a teacher of another vocabulary
def word_tokenizer(size: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocabulary = {f"w{i}": i for i in range(size)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="w0")),
                                                unk_token="w0", pad_token="w0")


def padded_copy(student, rows: int):
    """The student with its vocabulary padded to ``rows`` (extra embedding and head rows that no token uses)."""
    teacher = copy.deepcopy(student)
    teacher.resize_token_embeddings(rows)
    return teacher


class CausalText(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = TinyTextDataset(8).input_ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def distilling_llama(output_dir, teacher, tokenizer=None, **overrides):
    torch.manual_seed(0)
    return VConTrainer(model=tiny_llama(), args=args_for(output_dir, max_steps=2, **overrides),
                       vcon_config=VConConfig(method="prune", sparsity=0.5, transition_steps=3),
                       train_dataset=CausalText(), processing_class=tokenizer,
                       distillation=DistillationConfig(alpha=1.0, teacher=teacher))


def test_a_teacher_of_another_vocabulary_is_refused_when_the_trainer_is_built(tmp_path):
    torch.manual_seed(0)
    padded = padded_copy(tiny_llama(), 128)
    with pytest.raises(VConError, match=r"its vocabulary of 128 rows, the student's 99\. A teacher whose vocabulary "
                                        r"is the student's padded .*processing_class"):
        distilling_llama(tmp_path, padded)
    with pytest.raises(VConError, match=r"this one has 120 tokens, more than 99"):
        distilling_llama(tmp_path, padded, word_tokenizer(120))
    other_labels = tiny_bert()
    other_labels.config.num_labels = 5
    other_labels = type(other_labels)(other_labels.config)
    with pytest.raises(VConError, match=r"its 5 labels, the student's 3\. The teacher needs the student's head"):
        vcon_trainer(tmp_path, DistillationConfig(alpha=0.5, teacher=other_labels))


def test_a_padded_teacher_distils_over_the_shared_rows(tmp_path):
    torch.manual_seed(0)
    student = tiny_llama()
    trainer = distilling_llama(tmp_path, padded_copy(student, 128), word_tokenizer(99))  # the same student again
    assert torch.equal(trainer.teacher.lm_head.weight[:99], trainer.model.lm_head.weight)
    trainer.train()
    kd = [entry["distill/kd_loss"] for entry in trainer.state.log_history if "distill/kd_loss" in entry]
    assert abs(kd[0]) < 1e-6 and kd[-1] > 1e-6  # β = 1 at step 0: over the shared rows the student is the teacher


def test_tokenizers_named_differently_are_warned_about(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_llama()
    teacher.config.tokenizer_class = "GPT2TokenizerFast"
    student = tiny_llama()
    student.config.tokenizer_class = "LlamaTokenizerFast"
    with pytest.warns(VConWarning, match="The student's config names tokenizer .*the teacher's 'GPT2TokenizerFast'"):
        VConTrainer(model=student, args=args_for(tmp_path, max_steps=1), train_dataset=CausalText(),
                    vcon_config=VConConfig(method="prune", sparsity=0.5, transition_steps=3),
                    distillation=DistillationConfig(alpha=1.0, teacher=teacher))
