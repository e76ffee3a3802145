"""What distillation costs per training step next to plain VCON, as ratios measured in the same run.

BERT-base layer shapes (hidden 768, MLP 3072, 12 heads), a batch of 8 × 128 tokens, VCON pruning 90 % mid-transition
(β strictly between 0 and 1), one full ``VConTrainer.training_step`` (forward, distillation, backward) plus the AdamW
step and ``zero_grad``. Every distillation variant is timed interleaved with plain VCON (the order alternates every
repeat, so drift in a shared machine's load hits both); the table gives the median ratio over ``--repeats`` repeats
after ``--warmup`` steps, with its spread. Peak training memory is measured in a fresh process per variant, as
``benchmarks/overhead.py`` does (CPU: peak resident anonymous memory above its value before the model is built,
the teacher included; CUDA: ``max_memory_allocated``).

    python benchmarks/distill_cost.py                          # CPU fp32, 2 layers
    python benchmarks/distill_cost.py --device cuda --layers 12 --teacher_device cuda:1

Variants: the teacher a frozen fp32 copy of the model (the default), the same in bf16 (``teacher_dtype``), cached
float16 logits (``cache_teacher_logits``: no teacher forward at all), hidden-state matching on every layer, and with
``--teacher_device`` the teacher on another device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hf_vcon from this checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_vcon import DistillationConfig, VConConfig, VConTrainer, cache_teacher_logits  # noqa: E402
from overhead import _anon_rss_bytes, _PeakSampler, build_dense, machine, make_batch, sync  # noqa: E402

VARIANTS = ("plain VCON", "KD, fp32 teacher", "KD, bf16 teacher", "KD, cached fp16 logits", "KD + hidden states")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (12 in BERT-base)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32"], help=argparse.SUPPRESS)
    parser.add_argument("--teacher_device", default=None, help="adds a variant with the teacher there (e.g. cuda:1)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shape = "bert-base"  # overhead.build_dense's shapes: a BERT classifier
    return args


class IndexedBatch(torch.utils.data.Dataset):
    """The benchmark's batch as a dataset of its rows (what the logits are cached for)."""

    def __init__(self, batch: dict):
        self.batch = {key: value.cpu() for key, value in batch.items()}

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.batch.items()}


def distillation(args, name: str) -> DistillationConfig | None:
    if name == "plain VCON":
        return None
    if name == "KD, bf16 teacher":
        return DistillationConfig(alpha=args.alpha, teacher_dtype="bfloat16")
    if name == "KD, cached fp16 logits":
        return DistillationConfig(alpha=args.alpha, teacher_logits=args.cache)
    if name == "KD + hidden states":
        return DistillationConfig(alpha=args.alpha, hidden_layers="all")
    if name.startswith("KD, teacher on"):
        return DistillationConfig(alpha=args.alpha, teacher_device=args.teacher_device)
    return DistillationConfig(alpha=args.alpha)


class Runner:
    """A VConTrainer (with or without distillation) and its optimizer; ``step()`` is one timed training step."""

    def __init__(self, args, name: str, folder: str):
        self.args, self.count = args, 0
        model = build_dense(args)
        training = TrainingArguments(folder, max_steps=10**6, learning_rate=1e-5, report_to=[], save_strategy="no",
                                     use_cpu=args.device == "cpu", disable_tqdm=True)
        self.trainer = VConTrainer(model=model, args=training, train_dataset=IndexedBatch(make_batch(args)),
                                   vcon_config=VConConfig(method="prune", sparsity=0.9, transition_steps=10**9),
                                   distillation=distillation(args, name))
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1
        self.batch = make_batch(args)
        if name == "KD, cached fp16 logits":
            self.batch["teacher_index"] = torch.arange(args.batch, device=args.device)

    def step(self) -> float:
        trainer = self.trainer
        sync(self.args)
        start = time.perf_counter()
        trainer.vcon_callback.update(self.count, 10**6)  # β = 1 − t/10⁹: mid-transition
        trainer.training_step(trainer.model, dict(self.batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync(self.args)
        self.count += 1
        return time.perf_counter() - start


def time_pair(args, base: Runner, other: Runner) -> dict:
    for _ in range(args.warmup):
        base.step(), other.step()
    ratios, base_times, other_times = [], [], []
    for repeat in range(args.repeats):
        t_base, t_other = (base.step(), other.step()) if repeat % 2 == 0 else reversed((other.step(), base.step()))
        ratios.append(t_other / t_base)
        base_times.append(t_base)
        other_times.append(t_other)
    return {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "base_s": statistics.median(base_times), "other_s": statistics.median(other_times)}


def memory_child(args) -> None:
    """In a fresh process: peak memory of 3 training steps of one variant."""
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, sampler = _anon_rss_bytes(), _PeakSampler()
    with tempfile.TemporaryDirectory() as folder:
        runner = Runner(args, args.memory_child, folder)
        for _ in range(3):
            runner.step()
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    print(json.dumps({"peak_bytes": peak - base}))


def measure_memory(args, name: str) -> int:
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--vocab-size", str(args.vocab_size),
               "--threads", str(args.threads), "--device", args.device, "--alpha", str(args.alpha),
               "--cache", args.cache] + (["--teacher_device", args.teacher_device] if args.teacher_device else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # as overhead.py: freed blocks go back at once
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def write_cache(args, folder: str) -> str:
    teacher = build_dense(args).eval()
    return cache_teacher_logits(teacher, IndexedBatch(make_batch(args)), os.path.join(folder, "logits.safetensors"),
                                batch_size=args.batch, dtype=torch.float16)


def main(argv=None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    if args.memory_child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    variants = list(VARIANTS) + ([f"KD, teacher on {args.teacher_device}"] if args.teacher_device else [])
    print(f"# hf_vcon distillation cost: BERT-base shapes, {args.layers} layer(s), vocab {args.vocab_size}, batch "
          f"{args.batch}x{args.seq}, VCON prune 90 % mid-transition, alpha {args.alpha}, torch {torch.__version__}, "
          f"{machine(args)}")
    print(f"# medians of {args.repeats} interleaved repeats after {args.warmup} warm-up steps; ratios against plain "
          "VCON in the same run\n")
    with tempfile.TemporaryDirectory() as folder:
        args.cache = write_cache(args, folder)
        base = Runner(args, "plain VCON", os.path.join(folder, "base"))
        memory = {} if args.no_memory else {"plain VCON": measure_memory(args, "plain VCON")}
        print("| variant | step / plain VCON (median) | spread (min–max) | plain VCON step s | variant step s | "
              "peak memory / plain VCON |")
        print("|---|---|---|---|---|---|")
        for name in variants[1:]:
            runner = Runner(args, name, os.path.join(folder, name.replace(" ", "_")))
            result = time_pair(args, base, runner)
            del runner
            ratio = f"{measure_memory(args, name) / memory['plain VCON']:.3f}" if memory else "–"
            print(f"| {name} | {result['ratio']:.3f} | {result['min']:.3f}–{result['max']:.3f} | "
                  f"{result['base_s']:.3f} | {result['other_s']:.3f} | {ratio} |", flush=True)
    if memory:
        print(f"\nplain VCON peak training memory: {memory['plain VCON'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
