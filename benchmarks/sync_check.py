"""Host–device synchronisations per training step, per variant against the dense model of the same run.

On CUDA they are counted by the driver's own check, ``torch.cuda.set_sync_debug_mode("warn")`` (one warning per
synchronising call); on any other device by a dispatch mode that tallies the operations that synchronise on a GPU
(``tests/sync_count.py``: ``.item()``, ``torch.equal``, ``nonzero``, boolean-mask indexing…), which is how CI checks
them. The step is the trainer's: ``set_step``, forward, backward, optimizer step (SGD with momentum: AdamW on CPU reads
each parameter's step count, which is the optimizer's, not the model's).

    python benchmarks/sync_check.py                                      # CPU, BERT-base shapes, 2 layers
    python benchmarks/sync_check.py --device cuda --dtype bf16 --layers 12
    PYTHONPATH=/path/to/hf_vcon-0.3.0 python benchmarks/sync_check.py    # another version, same script
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from overhead import SHAPES, VARIANTS, build_dense, make_batch, variant_config  # noqa: E402

import hf_vcon  # noqa: E402
from hf_vcon import apply_vcon, get_vcon_state, set_step  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bert-base", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 master weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of: {', '.join(VARIANTS)}")
    return parser.parse_args(argv)


def count(args, function) -> int:
    """The synchronising calls ``function()`` makes."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                function()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(warning.message) for warning in caught)
    from sync_count import as_on_an_accelerator, count_syncs

    with as_on_an_accelerator():  # what a GPU would run: the CPU-only search near the previous cut reads values back
        return count_syncs(function).total


def step_function(args, model, optimizer, vcon: bool, step: int):
    batch = make_batch(args)

    def run():
        if vcon:
            set_step(model, step)
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def syncs_per_step(args, model, vcon: bool) -> int:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    for step in range(2):  # warm-up: the first forward's checks, the optimizer's state
        step_function(args, model, optimizer, vcon, step)()
    return count(args, step_function(args, model, optimizer, vcon, 2))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    how = "torch.cuda.set_sync_debug_mode('warn')" if args.device.startswith("cuda") else "dispatch-mode count"
    print(f"# host-device synchronisations per training step ({how}); hf_vcon from "
          f"{os.path.dirname(hf_vcon.__file__)}; {args.shape} shapes, {args.layers} layer(s), batch "
          f"{args.batch}x{args.seq}, {args.device}, {args.dtype}, torch {torch.__version__}\n")
    dense = syncs_per_step(args, build_dense(args), vcon=False)
    print("| variant | syncs per step | beyond dense | per targeted layer |")
    print("|---|---|---|---|")
    print(f"| dense | {dense} | 0 | – |")
    for name in args.variants:
        config, _ = variant_config(name)
        model = apply_vcon(build_dense(args), config)
        layers = len(get_vcon_state(model).layers)
        total = syncs_per_step(args, model, vcon=True)
        print(f"| {name} | {total} | {total - dense} | {(total - dense) / layers:.2f} |", flush=True)


if __name__ == "__main__":
    main()
