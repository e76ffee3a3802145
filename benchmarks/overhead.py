"""What VCON costs next to plain fine-tuning, as ratios against the dense baseline measured in the same run.

A model of one of three shapes (``--shape``): BERT-base (hidden 768, MLP 3072, 12 heads; the default), MiniLM-L6
(hidden 384, MLP 1536, 12 heads, as ``sentence-transformers/all-MiniLM-L6-v2``) or a Llama-style decoder of
TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 query / 4 key-value heads), with ``--layers`` blocks and a batch of
``--batch`` × ``--seq`` tokens; a full training step (forward, backward, ``--optimizer`` step, zero_grad). Each variant
is timed interleaved with the dense model (the order
alternates every repeat), so drift in a shared machine's load hits both; the table gives the median ratio over
``--repeats`` repeats after ``--warmup`` steps, with its spread (min–max). Peak training memory is measured in
a fresh subprocess per variant (CPU: peak resident anonymous memory, sampled every millisecond, above its value
before the model is built, with glibc's mmap threshold fixed so freed tensors are returned at once; CUDA:
``max_memory_allocated``). Then the inference latency of the exported low-rank model (``save_compressed`` →
``load_compressed``) against the merged dense model, whole model and targeted layers alone.

    python benchmarks/overhead.py                                        # CPU fp32, BERT-base, 2 layers, 8 x 128
    python benchmarks/overhead.py --shape minilm --layers 6 --seq 32     # GLUE-like short sequences
    python benchmarks/overhead.py --device cuda --dtype bf16 --layers 12 --batch 32
    python benchmarks/overhead.py --grid --no-inference                  # the settings of GRID, then one summary table

Every step calls ``hf_vcon.set_step`` as the trainer does: ``transition`` rows use a schedule whose β stays
strictly between 0 and 1, ``after`` rows Q = 0 (β = 0; low-rank then calls ``release_dense_paths``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_vcon  # noqa: E402
from hf_vcon import VConConfig, apply_vcon, release_dense_paths, set_step  # noqa: E402

# name -> (VConConfig kwargs, phase)
VARIANTS = {
    "prune transition": (dict(method="prune", sparsity=0.9), "transition"),
    "prune after": (dict(method="prune", sparsity=0.9), "after"),
    "binary transition": (dict(method="binary"), "transition"),
    "binary after": (dict(method="binary"), "after"),
    "lowrank transition": (dict(method="lowrank", rank_ratio=0.25), "transition"),
    "lowrank after": (dict(method="lowrank", rank_ratio=0.25), "after"),
    "quant transition": (dict(method="quant", bits=4, strategy="group", group_size=128), "transition"),
    "quant after": (dict(method="quant", bits=4, strategy="group", group_size=128), "after"),
    # the float formats and activation quantization (W8A8: g(x) = C·Q(x) + b, two matmuls while 0 < β < 1)
    "nvfp4 transition": (dict(method="quant", scheme="NVFP4A16"), "transition"),
    "fp8 w8a8 transition": (dict(method="quant", scheme="FP8_DYNAMIC"), "transition"),
    "fp8 w8a8 after": (dict(method="quant", scheme="FP8_DYNAMIC"), "after"),
    "int8 w8a8 transition": (dict(method="quant", scheme="W8A8"), "transition"),
    "int8 w8a8 after": (dict(method="quant", scheme="W8A8"), "after"),
    # W4A4 and static FP8 inputs (FP8 and NVFP4 also fold max|x| into each layer's observer at every step)
    "fp8 static transition": (dict(method="quant", scheme="FP8"), "transition"),
    "fp8 static after": (dict(method="quant", scheme="FP8"), "after"),
    "nvfp4 w4a4 transition": (dict(method="quant", scheme="NVFP4"), "transition"),
    "nvfp4 w4a4 after": (dict(method="quant", scheme="NVFP4"), "after"),
    "mxfp4 w4a4 transition": (dict(method="quant", scheme="MXFP4"), "transition"),
    "mxfp4 w4a4 after": (dict(method="quant", scheme="MXFP4"), "after"),
}
TARGETS = {
    "prune transition": ("time", "<= 1.10"), "binary transition": ("time", "<= 1.10"),
    "prune after": ("time", "<= 1.05"), "binary after": ("time", "<= 1.05"),
    "quant transition": ("time", "<= 1.10"), "quant after": ("time", "<= 1.05"),
    "lowrank transition": ("time", "<= 1.25"), "lowrank after": ("time", "< 1.0"),
}
MEMORY_TARGET = "<= 1.05 (prune, binary, quant)"
# --grid: the settings users train at, from the benchmark's own to GLUE-like short sequences and a one-layer SGD step
GRID = (
    {"shape": "bert-base", "layers": 2, "batch": 8, "seq": 128},
    {"shape": "minilm", "layers": 6, "batch": 8, "seq": 32},
    {"shape": "bert-base", "layers": 1, "batch": 2, "seq": 128, "optimizer": "sgd", "threads": 1},
)
# --shape -> (hidden, MLP, query heads, key-value heads); "llama" is a causal LM, the others BERT classifiers
SHAPES = {"bert-base": (768, 3072, 12, 12), "minilm": (384, 1536, 12, 12), "llama": (2048, 5632, 32, 4)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bert-base", choices=list(SHAPES), help="the model's layer shapes")
    parser.add_argument("--layers", type=int, default=2, help="blocks (12 in BERT-base, 6 in MiniLM-L6, 22 in TinyLlama)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="30522 for the BERT shapes, 32000 for llama; a small vocabulary leaves the targeted "
                             "layers a larger share of the step")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 master weights")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--grid", action="store_true",
                        help="run every setting of GRID (shape, layers, batch, seq, optimizer, threads given there win)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--recompute-every", type=int, nargs="*", default=[10],
                        help="extra 'prune/binary transition' rows with VConConfig(recompute_every=k)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both the dense and the VCON model (the ratio of compiled steps)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-timing", action="store_true", help="peak memory only")
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument("--baseline-src", default=None,
                        help="a checkout of another hf_vcon version (e.g. a git worktree of 0.3.0): each row is timed "
                             "with both versions in alternating subprocesses, and the table shows both ratios")
    parser.add_argument("--ratio-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ setup
def vocab_size(args) -> int:
    """``--vocab-size``, or the vocabulary of the shape's model."""
    return args.vocab_size or (32000 if args.shape == "llama" else 30522)


def build_dense(args) -> torch.nn.Module:
    torch.manual_seed(0)
    hidden, mlp, heads, kv_heads = SHAPES[args.shape]
    if args.shape == "llama":
        config = LlamaConfig(vocab_size=vocab_size(args), hidden_size=hidden, intermediate_size=mlp,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=args.layers,
                             max_position_embeddings=max(args.seq, 128))
        return LlamaForCausalLM(config).to(args.device).train()
    config = BertConfig(vocab_size=vocab_size(args), hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                        num_hidden_layers=args.layers, max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(config).to(args.device).train()


def make_batch(args) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size(args), (args.batch, args.seq), generator=generator)
    labels = input_ids if args.shape == "llama" else torch.randint(0, 2, (args.batch,), generator=generator)
    batch = {"input_ids": input_ids, "labels": labels}
    return {key: value.to(args.device) for key, value in batch.items()}


def variant_config(name: str, recompute_every: int = 1) -> tuple[VConConfig, str]:
    kwargs, phase = VARIANTS[name]
    transition_steps = 10**9 if phase == "transition" else 0  # β ≈ 1 − t/1e9 ∈ (0, 1) vs β = 0
    if recompute_every != 1:
        kwargs = {**kwargs, "recompute_every": recompute_every}
    return VConConfig(target_modules="all-linear", transition_steps=transition_steps, **kwargs), phase


class Runner:
    """A model, its optimizer and a step counter; ``step()`` is one timed training step."""

    def __init__(self, args, model, vcon: bool, phase: str = "dense"):
        self.args, self.model, self.vcon, self.phase = args, model, vcon, phase
        trainable = [p for p in model.parameters() if p.requires_grad]
        if args.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(trainable, lr=1e-3)
        else:
            self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        self.batch = make_batch(args)
        self.forward = torch.compile(model) if args.compile else model
        self.count = 0
        if vcon:
            set_step(model, 0)
            if phase == "after":
                release_dense_paths(model, self.optimizer)

    def step(self) -> float:
        sync(self.args)
        start = time.perf_counter()
        if self.vcon:
            set_step(self.model, self.count)
        with torch.autocast(device_type=self.args.device.split(":")[0], dtype=torch.bfloat16,
                            enabled=self.args.dtype == "bf16"):
            loss = self.forward(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.args)
        self.count += 1
        return time.perf_counter() - start


def sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def vcon_runner(args, dense_model, name: str, recompute_every: int = 1, in_place: bool = False) -> Runner:
    config, phase = variant_config(name, recompute_every)
    model = apply_vcon(dense_model if in_place else copy.deepcopy(dense_model), config)
    return Runner(args, model, vcon=True, phase=phase)


# ------------------------------------------------------------------------------------------------ timing
def time_pair(args, dense: Runner, other: Runner) -> dict:
    for _ in range(args.warmup):
        dense.step()
        other.step()
    ratios, dense_times, other_times = [], [], []
    for repeat in range(args.repeats):
        if repeat % 2:
            t_other, t_dense = other.step(), dense.step()
        else:
            t_dense, t_other = dense.step(), other.step()
        ratios.append(t_other / t_dense)
        dense_times.append(t_dense)
        other_times.append(t_other)
    return {
        "ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
        "dense_s": statistics.median(dense_times), "vcon_s": statistics.median(other_times),
    }


# ------------------------------------------------------------------------------------------------ memory
def _anon_rss_bytes() -> int:
    """Resident anonymous memory (tensors live here; file-backed library pages, which the kernel may page out and
    back in at any time, do not count)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssAnon:"))


class _PeakSampler:
    """Polls ``_anon_rss_bytes`` every millisecond on a thread; ``peak`` is the highest value seen."""

    def __init__(self):
        import threading

        self.peak, self._stop = _anon_rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon_rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_rss_bytes())


def memory_child(args) -> None:
    """Run in a fresh process: peak memory of 3 training steps of one variant (or 'dense')."""
    torch.set_num_threads(args.threads)
    name, _, every = args.memory_child.partition("@")
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _anon_rss_bytes()
        sampler = _PeakSampler()
    dense = build_dense(args)
    if name == "dense":
        runner = Runner(args, dense, vcon=False)
    else:
        runner = vcon_runner(args, dense, name, int(every or 1), in_place=True)
    for _ in range(3):
        runner.step()
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    print(json.dumps({"peak_bytes": peak - base}))


def measure_memory(args, name: str) -> int:
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--shape", args.shape,
               "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--vocab-size", str(vocab_size(args)),
               "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
               "--optimizer", args.optimizer]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        os.environ.get("PYTHONPATH", "")]),
           # A fixed mmap threshold makes glibc return every freed block >= 64 KiB at once, so peak RSS measures the
           # live tensors rather than what the allocator keeps cached after raising its dynamic threshold.
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


# --------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def time_inference(args, dense_model) -> dict:
    """Exported low-rank model (rank_ratio 0.25, loaded with load_compressed) vs the merged dense model."""
    model = apply_vcon(copy.deepcopy(dense_model), VConConfig(method="lowrank", rank_ratio=0.25, transition_steps=0))
    names = list(model.vcon_state.targeted_module_names)
    with tempfile.TemporaryDirectory() as folder:
        hf_vcon.save_compressed(model, folder)
        compact = hf_vcon.load_compressed(folder).to(args.device).eval()
    merged = hf_vcon.merge_and_unload(model).to(args.device).eval()
    batch = {"input_ids": make_batch(args)["input_ids"]}

    def timed(fn) -> float:
        sync(args)
        start = time.perf_counter()
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            fn()
        sync(args)
        return time.perf_counter() - start

    def interleaved(fn_dense, fn_compact) -> tuple[float, float]:
        for _ in range(args.warmup):
            fn_dense(), fn_compact()
        dense_t, compact_t = [], []
        for repeat in range(args.repeats):
            pair = (timed(fn_dense), timed(fn_compact)) if repeat % 2 == 0 else tuple(reversed((timed(fn_compact), timed(fn_dense))))
            dense_t.append(pair[0])
            compact_t.append(pair[1])
        return statistics.median(dense_t), statistics.median(compact_t)

    model_dense, model_compact = interleaved(lambda: merged(**batch), lambda: compact(**batch))
    layers_dense = layers_compact = 0.0
    for name in names:
        dense_layer, compact_layer = merged.get_submodule(name), compact.get_submodule(name)
        x = torch.randn(args.batch, args.seq, dense_layer.in_features, device=args.device)
        d, c = interleaved(lambda: dense_layer(x), lambda: compact_layer(x))
        layers_dense += d
        layers_compact += c
    return {"model": model_compact / model_dense, "layers": layers_compact / layers_dense,
            "layers_dense_s": layers_dense, "layers_compact_s": layers_compact}


# ------------------------------------------------------------------------------------- two versions, one run
def ratio_child(args) -> None:
    """One row's timing with the hf_vcon this process imports; prints it as the last line, in JSON."""
    torch.set_num_threads(args.threads)
    name, every = json.loads(args.ratio_child)
    dense_model = build_dense(args)
    result = time_pair(args, Runner(args, dense_model, vcon=False), vcon_runner(args, dense_model, name, every))
    print(json.dumps({**result, "source": os.path.dirname(hf_vcon.__file__)}))


def _child_ratio(args, source: str, row: tuple) -> dict:
    argv = [sys.argv[0]] if sys.argv and sys.argv[0].endswith("overhead.py") else [os.path.abspath(__file__)]
    flags = ["--shape", args.shape, "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq),
             "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
             "--device", args.device, "--dtype", args.dtype, "--optimizer", args.optimizer,
             "--ratio-child", json.dumps(list(row))] + (["--compile"] if args.compile else [])
    if args.vocab_size:
        flags += ["--vocab-size", str(args.vocab_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *argv, *flags], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_versions(args) -> None:
    """Each row timed with the baseline's hf_vcon and with this one, in alternating subprocesses (baseline, this,
    this, baseline: drift in a shared machine's load hits both), each ratio against the dense model in its own
    process; the table gives the median over the subprocesses of both versions side by side."""
    ours = os.path.dirname(os.path.dirname(os.path.abspath(hf_vcon.__file__)))
    sources = {"baseline": os.path.abspath(args.baseline_src), "this": ours}
    print(f"# hf_vcon overhead, two versions: {args.shape} shapes, {args.layers} layer(s), batch {args.batch}x{args.seq}, "
          f"{args.optimizer}, torch {torch.__version__}, {machine(args)}")
    print(f"# baseline: {sources['baseline']}; this: {sources['this']}; per version two subprocesses of "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up steps\n")
    rows = [(name, 1) for name in args.variants]
    rows += [(name, k) for k in args.recompute_every if k != 1 for name in args.variants
             if name in ("prune transition", "binary transition")]
    print("| variant | baseline step / dense | this step / dense | this / baseline | target (time) |")
    print("|---|---|---|---|---|")
    for row in rows:
        results = {"baseline": [], "this": []}
        for version in ("baseline", "this", "this", "baseline"):
            result = _child_ratio(args, sources[version], row)
            if os.path.dirname(os.path.abspath(result["source"])) != sources[version]:
                raise RuntimeError(f"the {version} subprocess imported hf_vcon from {result['source']}, not {sources[version]}")
            results[version].append(result)
        base = statistics.median(result["ratio"] for result in results["baseline"])
        this = statistics.median(result["ratio"] for result in results["this"])
        label = row[0] if row[1] == 1 else f"{row[0]}, recompute_every={row[1]}"
        target = TARGETS[row[0]][1] if row[1] == 1 else "(option)"
        print(f"| {label} | {base:.3f} | {this:.3f} | {this / base:.3f} | {target} |", flush=True)


# ------------------------------------------------------------------------------------------------ main
def machine(args) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({args.dtype})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch.set_num_threads({args.threads}), {args.dtype}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    if args.ratio_child:
        ratio_child(args)
        return
    if args.baseline_src:
        compare_versions(args)
        return
    if not args.grid:
        run_setting(args)
        return
    ratios = {}
    for setting in GRID:
        setting_args = argparse.Namespace(**{**vars(args), **setting})
        print()
        ratios[setting_label(setting_args)] = run_setting(setting_args)
    print_grid_summary(ratios, args)


def setting_label(args) -> str:
    return f"{args.shape} ×{args.layers}, {args.batch}×{args.seq}, {args.optimizer}, {args.threads} thread(s)"


def print_grid_summary(ratios: dict, args) -> None:
    """One table: step / dense per variant (rows) and setting (columns), from the tables printed above."""
    settings = list(ratios)
    print(f"\n# grid summary (step / dense, medians; {machine(args).split(', torch.set_num_threads')[0]})\n")
    print("| variant | " + " | ".join(settings) + " | target (time) |")
    print("|---|" + "---|" * (len(settings) + 1))
    for name in next(iter(ratios.values())):
        cells = [f"{ratios[setting][name]:.3f}" for setting in settings]
        target = TARGETS[name][1] if name in TARGETS else "(option)"
        print(f"| {name} | " + " | ".join(cells) + f" | {target} |")


def run_setting(args) -> dict:
    """Print one setting's table (and memory, inference); return each row's median ratio by its label."""
    torch.set_num_threads(args.threads)
    print(f"# hf_vcon overhead: {args.shape} shapes, {args.layers} layer(s), vocab {vocab_size(args)}, batch "
          f"{args.batch}x{args.seq}, {args.optimizer}, torch {torch.__version__}, {machine(args)}")
    print(f"# medians of {args.repeats} interleaved repeats after {args.warmup} warm-up steps\n")

    dense_model = build_dense(args)
    dense = Runner(args, dense_model, vcon=False)
    rows = [(name, 1) for name in args.variants]
    rows += [(name, k) for k in args.recompute_every if k != 1 for name in args.variants
             if name in ("prune transition", "binary transition")]
    memory, ratios = {}, {}
    if not args.no_memory:
        memory["dense"] = measure_memory(args, "dense")
    print("| variant | step / dense (median) | spread (min–max) | dense step s | VCON step s | peak memory / dense | target (time) |")
    print("|---|---|---|---|---|---|---|")
    for name, every in rows:
        label = name if every == 1 else f"{name}, recompute_every={every}"
        timing = "– | – | – | –"
        if not args.no_timing:
            result = time_pair(args, dense, vcon_runner(args, dense_model, name, every))
            ratios[label] = result["ratio"]
            timing = (f"{result['min']:.3f}–{result['max']:.3f} | {result['dense_s']:.3f} | {result['vcon_s']:.3f}")
            timing = f"{result['ratio']:.3f} | {timing}"
        mem = "–"
        if not args.no_memory and every == 1:
            mem = f"{measure_memory(args, name) / memory['dense']:.3f}"
        target = TARGETS.get(name, ("time", "(measured)"))[1] if every == 1 else "(option)"
        print(f"| {label} | {timing} | {mem} | {target} |", flush=True)
    if memory:
        print(f"\ndense peak training memory: {memory['dense'] / 2**20:.0f} MiB; memory target {MEMORY_TARGET}")
    if not args.no_inference:
        result = time_inference(args, dense_model)
        print(f"\nexported lowrank (rank_ratio 0.25) inference latency / merged dense: targeted layers "
              f"{result['layers']:.3f} (target <= 0.7; {result['layers_compact_s'] * 1e3:.1f} ms vs "
              f"{result['layers_dense_s'] * 1e3:.1f} ms), whole model {result['model']:.3f}")
    return ratios


if __name__ == "__main__":
    main()
