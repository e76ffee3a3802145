"""Inference latency and size of structurally pruned models (``method="structured"``) against the dense model, as
ratios measured in one run.

Two shapes: BERT-base (hidden 768, 12 heads, MLP 3072, vocabulary 30522) and a Llama-style decoder of TinyLlama-1.1B's
shape (hidden 2048, 32 query heads of 64, 4 key/value heads, MLP 5632, vocabulary 32000), each with ``--layers``
blocks (12 and 22 in the real models; the per-block ratios are what matter, the embeddings and head are fixed). For
every setting the dense model is patched, merged (``save_merged``) and reloaded with plain ``from_pretrained``: the
model timed is the smaller checkpoint a user gets. Each setting is timed interleaved with the dense model (the order
alternates every repeat), so drift in a shared machine's load hits both; the table gives the median ratio over
``--repeats`` repeats with its spread (min–max), the parameters before → after and the share of the matmul FLOPs
left (the Linear layers' weights per token, attention scores aside): the speedup a perfectly efficient kernel would
give is its inverse.

    python benchmarks/structured_speed.py                         # CPU fp32, 1 thread, batch 1 and 8 × 128 tokens
    python benchmarks/structured_speed.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import transformers  # noqa: E402
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel  # noqa: E402

import hf_vcon  # noqa: E402
from hf_vcon import VConConfig, VConWarning, apply_vcon, save_merged  # noqa: E402

SPARSITIES = (0.25, 0.5, 0.75)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=["bert-base", "llama"], choices=["bert-base", "llama"])
    parser.add_argument("--layers", type=int, default=2, help="blocks per model")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="batch sizes (sequences of --seq)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json", default=None, help="append one JSON line per row to this file")
    return parser.parse_args(argv)


def dense_model(shape: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if shape == "bert-base":
        return BertModel(BertConfig(num_hidden_layers=layers))
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                         num_hidden_layers=layers, vocab_size=32000)
    return LlamaModel(config)


def settings(shape: str) -> list[tuple[str, dict]]:
    rows = [(f"neurons {s:.0%}", dict(neuron_sparsity=s)) for s in SPARSITIES]
    # 4 key/value groups: 25 %, 50 %, 75 % remove 1, 2, 3 of them (8 query heads each); 25 % leaves 24 query heads,
    # which LlamaConfig refuses (hidden_size 2048 is no multiple of 24), and apply_vcon says so: the row shows it
    if shape == "llama":
        rows += [(f"kv groups {s:.0%}", dict(neuron_sparsity=0.0, head_sparsity=s)) for s in SPARSITIES]
        rows += [(f"neurons + kv groups {s:.0%}", dict(neuron_sparsity=s, head_sparsity=s)) for s in SPARSITIES]
    return rows


def exported(dense: torch.nn.Module, options: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The smaller checkpoint a user gets: patched, merged, saved, reloaded with plain from_pretrained."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VConWarning)
        model = apply_vcon(copy.deepcopy(dense), VConConfig(method="structured", **options))
        with tempfile.TemporaryDirectory() as folder:
            save_merged(model, folder)
            return type(dense).from_pretrained(folder, dtype=dtype).to(device).eval()


def linear_weights(model: torch.nn.Module) -> int:
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(args, dense, other, batch: dict) -> dict:
    def timed(model) -> float:
        sync(args.device)
        start = time.perf_counter()
        model(**batch)
        sync(args.device)
        return time.perf_counter() - start

    dense_times, other_times = [], []
    with torch.inference_mode():
        for _ in range(args.warmup):
            timed(dense), timed(other)
        for repeat in range(args.repeats):
            pair = (dense, other) if repeat % 2 == 0 else (other, dense)
            first, second = timed(pair[0]), timed(pair[1])
            dense_times.append(first if pair[0] is dense else second)
            other_times.append(second if pair[0] is dense else first)
    ratios = [d / o for d, o in zip(dense_times, other_times)]
    return {"speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "dense_ms": 1000 * statistics.median(dense_times), "pruned_ms": 1000 * statistics.median(other_times)}


def run_shape(args, shape: str) -> list[dict]:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dense_fp32 = dense_model(shape, args.layers).eval()
    dense = copy.deepcopy(dense_fp32).to(device=args.device, dtype=dtype).eval()
    vocab = dense.config.vocab_size
    rows = []
    for label, options in settings(shape):
        try:
            pruned = exported(dense_fp32, options, dtype, args.device)
        except ValueError as error:
            reason = str(error).split("which transformers refuses: ")[-1].split("\n")[-1].strip()
            print(f"| {shape} | {label} | refused by apply_vcon: {reason} |", flush=True)
            continue
        config = pruned.config
        for batch_size in args.batches:
            generator = torch.Generator().manual_seed(batch_size)
            batch = {"input_ids": torch.randint(0, vocab, (batch_size, args.seq), generator=generator).to(args.device)}
            row = {"shape": shape, "setting": label, "batch": batch_size, "seq": args.seq, "layers": args.layers,
                   "params_dense": sum(p.numel() for p in dense.parameters()),
                   "params_pruned": sum(p.numel() for p in pruned.parameters()),
                   "flops_left": linear_weights(pruned) / linear_weights(dense),
                   "intermediate_size": config.intermediate_size,
                   "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
                   "heads": config.num_attention_heads, **time_pair(args, dense, pruned, batch)}
            rows.append(row)
            print_row(row)
        del pruned
    return rows


HEADER = ("| shape | setting | batch × tokens | MLP size | heads (kv) | params dense → pruned | matmul FLOPs left | "
          "ideal | measured speedup (min–max) | dense → pruned ms |")


def print_row(row: dict) -> None:
    print(f"| {row['shape']} | {row['setting']} | {row['batch']} × {row['seq']} | {row['intermediate_size']} | "
          f"{row['heads']} ({row['kv_heads']}) | {row['params_dense'] / 1e6:.1f}M → {row['params_pruned'] / 1e6:.1f}M | "
          f"{row['flops_left']:.3f} | {1 / row['flops_left']:.2f}× | **{row['speedup']:.2f}×** "
          f"({row['min']:.2f}–{row['max']:.2f}) | {row['dense_ms']:.1f} → {row['pruned_ms']:.1f} |", flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]}, {len(names)} logical CPUs" if names else platform.processor() or "cpu"


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"hf_vcon {hf_vcon.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.device} ({device}), {args.dtype}, {args.threads} thread(s); {args.layers} blocks per model; "
          f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    rows = [row for shape in args.shapes for row in run_shape(args, shape)]
    if args.json:
        with open(args.json, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({**row, "device": args.device, "dtype": args.dtype, "threads": args.threads}) + "\n")


if __name__ == "__main__":
    main()
