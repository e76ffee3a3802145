"""The pruning cut's selection on a large weight: ``kthvalue`` against ``topk`` and a full sort, and the whole
sync-free keep-mask (:func:`hf_vcon.compressors.selection.keep_largest`), in milliseconds.

pytorch#75599 found ``kthvalue`` far slower than a sort on CUDA; this says which to use per device. The weight is
Llama-7B's MLP shape, 4096 × 11008, in bf16 (and its fp32 copy), at sparsity 0.5 (per layer).

    python benchmarks/selection_timing.py --device cuda
    python benchmarks/selection_timing.py --repeats 3                     # CPU (slow: 45 M values)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_vcon.compressors.selection import keep_largest, kept_count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 11008])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def timed(args, function) -> float:
    """Median milliseconds of ``function()`` after one warm-up call."""
    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    function()
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*args.shape, generator=generator).to(torch.bfloat16).to(args.device)
    print(f"# selection on a {args.shape[0]}x{args.shape[1]} weight, sparsity {args.sparsity} per layer, "
          f"{args.device}, torch {torch.__version__}; median ms of {args.repeats}\n")
    print("| operation | bf16 | fp32 |")
    print("|---|---|---|")
    results = {}
    for label, w in (("bf16", weight), ("fp32", weight.float())):
        scores = w.abs().reshape(1, -1)
        keep = kept_count(scores.numel(), args.sparsity)
        results[label] = {
            "kthvalue (the keep-th largest)": timed(args, lambda: scores.kthvalue(scores.numel() - keep + 1, dim=-1)),
            "topk (k largest, unsorted)": timed(args, lambda: scores.topk(keep, dim=-1, sorted=False)),
            "sort (descending)": timed(args, lambda: scores.sort(dim=-1, descending=True)),
            "keep-mask, sync-free (kthvalue + ties by position)": timed(args, lambda: keep_largest(scores, keep)),
        }
    for operation in results["bf16"]:
        print(f"| {operation} | {results['bf16'][operation]:.1f} | {results['fp32'][operation]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
