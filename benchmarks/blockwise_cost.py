"""What block-wise VCON costs to train next to layer-wise VCON and plain fine-tuning, measured in one run.

A BERT encoder (default: hidden 256, MLP 1024, 4 layers, batch 8 × 128 tokens) trains full steps (forward,
backward, AdamW step, zero_grad) in these variants, for each method given:

- ``dense``: no VCON, the baseline;
- ``layer transition`` / ``layer after``: layer-wise VCON at β = 0.5 / β = 0 (every Linear of every layer);
- ``block transition``: block-wise VCON, every layer a block, all at β = 0.5 (f and g both run);
- ``block staggered``: block-wise with ``stagger=True`` in the middle of the second block's window: block 0 at
  β = 0 (g only), block 1 at β = 0.5 (f and g), the others at β = 1 (f only): the typical step of Figure 2;
- ``block after``: block-wise at β = 0 (g only; f is still held and gets zero gradients).

Each repeat times every variant once, in a rotating order, so drift in a shared machine's load hits all of them;
a variant's ratios to ``dense`` and to the layer-wise variant of the same phase are computed within each repeat,
and the table gives the median ratios over the repeats (min–max for ``dense``) and the median ms per step. Also
the trainable parameters, which set the optimizer state (AdamW keeps two moments per trainable number).

    python benchmarks/blockwise_cost.py                      # CPU fp32, prune and lowrank
    python benchmarks/blockwise_cost.py --methods binary --layers 2 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from hf_vcon import VConConfig, apply_vcon, get_block_betas, set_beta, set_step  # noqa: E402

METHOD_SETTINGS = {"prune": dict(sparsity=0.9), "binary": dict(), "lowrank": dict(rank_ratio=0.25)}
BLOCKS = r"bert\.encoder\.layer\.\d+"


def build(args) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=args.seq, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).train()


def variants(args, method: str) -> dict[str, torch.nn.Module]:
    """The models of one method, each already at the β of its phase."""
    base = build(args)
    setting = METHOD_SETTINGS[method]
    models = {"dense": copy.deepcopy(base)}
    for phase, beta in (("transition", 0.5), ("after", 0.0)):
        layer = apply_vcon(copy.deepcopy(base), VConConfig(method=method, **setting))
        set_beta(layer, beta)
        models[f"layer {phase}"] = layer
    block_wise = dict(method=method, granularity="block", target_blocks=BLOCKS, **setting)
    block = apply_vcon(copy.deepcopy(base), VConConfig(**block_wise))
    set_beta(block, 0.5)
    models["block transition"] = block
    count = args.layers
    staggered = apply_vcon(copy.deepcopy(base), VConConfig(**block_wise, stagger=True, transition_steps=2 * count))
    set_step(staggered, 3)  # windows of 2 steps: block 0 done, block 1 half-way, the rest not started
    betas = list(get_block_betas(staggered).values())
    assert betas[:2] == [0.0, 0.5] and all(b == 1.0 for b in betas[2:]), betas
    models["block staggered"] = staggered
    after = apply_vcon(copy.deepcopy(base), VConConfig(**block_wise))
    set_beta(after, 0.0)
    models["block after"] = after
    return models


def step_fn(model: torch.nn.Module, inputs: dict):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


LAYER_WISE_OF = {
    "block transition": "layer transition",
    "block staggered": "layer transition",
    "block after": "layer after",
}


def measure(args, method: str) -> list[tuple]:
    models = variants(args, method)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, 1000, (args.batch, args.seq), generator=generator),
        "labels": torch.randint(0, 2, (args.batch,), generator=generator),
    }
    steps = {name: step_fn(model, inputs) for name, model in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - start) / args.steps)
    rows = []
    for name in names:
        ratios = [t / d for t, d in zip(times[name], times["dense"])]
        versus = LAYER_WISE_OF.get(name)
        layer_ratio = statistics.median(t / l for t, l in zip(times[name], times[versus])) if versus else None
        trainable = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
        median_ms = statistics.median(times[name]) * 1e3
        rows.append((name, median_ms, statistics.median(ratios), min(ratios), max(ratios), layer_ratio, trainable))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["prune", "lowrank"], choices=sorted(METHOD_SETTINGS))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timing")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.layers < 2:
        parser.error("--layers must be >= 2 for the staggered variant")
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; BERT hidden {args.hidden}, "
          f"{args.layers} layers, batch {args.batch} x {args.seq} tokens, fp32, median of {args.repeats} repeats x {args.steps} steps\n")
    for method in args.methods:
        rows = measure(args, method)
        dense_params = rows[0][-1]
        print(f"### {method} ({', '.join(f'{k}={v}' for k, v in METHOD_SETTINGS[method].items()) or 'default'})\n")
        print("| variant | ms/step | × dense (min–max) | × layer-wise, same phase | trainable params |")
        print("|---|---|---|---|---|")
        for name, ms, ratio, low, high, layer_ratio, trainable in rows:
            versus = f"{layer_ratio:.2f}" if layer_ratio is not None else ""
            print(f"| {name} | {ms:.0f} | {ratio:.2f} ({low:.2f}–{high:.2f}) | {versus} | "
                  f"{trainable:,} ({trainable / dense_params:.2f}×) |")
        print()


if __name__ == "__main__":
    main()
