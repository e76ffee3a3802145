"""Worker that ``tests/distill/test_distill_ddp.py`` launches on two gloo ranks (``torchrun``), and imports for the one-process
reference: VConTrainer with distillation on a tiny BERT, under DDP with ``ddp_find_unused_parameters=False``.

Each rank writes ``<output>/<run>-rank<r>.json``: how the Trainer wrapped the student and whether anything wrapped
the teacher, whether the teacher's weights changed or got gradients, the logged losses and the final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers import TrainingArguments  # noqa: E402

from conftest import TinyTextDataset, close_process_group, tiny_bert  # noqa: E402
from hf_vcon import DistillationConfig, VConConfig, VConTrainer  # noqa: E402

MAX_STEPS = 4
GLOBAL_BATCH = 4
# run -> (alpha, average_tokens_across_devices): the mixed loss with per-rank normalisation, and pure KD normalised
# by the item count gathered over ranks (the Trainer then multiplies the loss by the number of processes).
RUNS = {"mixed": (0.5, False), "kd": (1.0, True)}


def train(run: str, output: str) -> dict:
    """SGD, so that a gradient of the wrong scale shows in the weights (Adam would normalise it away)."""
    alpha, average_tokens = RUNS[run]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(
        os.path.join(output, run), max_steps=MAX_STEPS, per_device_train_batch_size=GLOBAL_BATCH // world_size,
        optim="sgd", learning_rate=0.5, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        average_tokens_across_devices=average_tokens,
    )
    torch.manual_seed(0)
    model = tiny_bert()
    trainer = VConTrainer(model=model, args=args, train_dataset=TinyTextDataset(),
                          vcon_config=VConConfig(method="prune", sparsity=0.5, transition_steps=2),
                          distillation=DistillationConfig(alpha=alpha, temperature=2.0))
    teacher = trainer.teacher
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    trainer.train()
    wrapped = trainer.model_wrapped
    wrapped_ids = {id(p) for p in wrapped.parameters()}
    return {
        "world_size": trainer.args.world_size,
        "student_wrapper": type(wrapped).__name__,
        "teacher_wrapped": any(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in teacher.modules()),
        "teacher_in_ddp": bool(wrapped_ids & {id(p) for p in teacher.parameters()}),
        "teacher_unchanged": all(torch.equal(value, before[key]) for key, value in teacher.state_dict().items()),
        "teacher_grads": any(p.grad is not None for p in teacher.parameters()),
        "kd_losses": [entry["distill/kd_loss"] for entry in trainer.state.log_history if "distill/kd_loss" in entry],
        "weights": {key: value.tolist() for key, value in trainer.model.state_dict().items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    options = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    for run in RUNS:
        with open(os.path.join(options.output, f"{run}-rank{rank}.json"), "w", encoding="utf-8") as handle:
            json.dump(train(run, options.output), handle)
    close_process_group()


if __name__ == "__main__":
    main()
