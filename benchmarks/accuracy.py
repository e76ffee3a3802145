"""Accuracy evidence: post-shot vs VCON vs gradual magnitude pruning (GMP), on real data, in one command.

For each task and method, every arm starts from the same dense trained model and fine-tunes the compressed model
with the same data, budget (optimizer steps), learning rate schedule and seeds; only the transition differs:

- ``post-shot``: ``transition_steps=0`` (compress at once, then fine-tune);
- ``vcon``:      ``transition_steps=Q`` (β from 1 to 0 over Q steps, then fine-tune the compressed model);
- ``gmp``:       methods with a gradual option (prune, structured), ``transition="gmp"``: a hard mask whose
                 sparsity rises as s·(1 − (1 − t/Q)³).

The final number of every arm is the test accuracy of the compressed model (β = 0, full compression) after the
last step; there is no early stopping or checkpoint selection. Outputs in ``--out``: ``results.jsonl`` (one line per
run, with its curve; runs already there are skipped, so an interrupted sweep resumes), ``accuracy.md`` (mean ± std
over seeds) and ``curves_<task>.png`` (compressed-model accuracy and β against the step); with ``--q_sweep``,
``q_sweep.md`` and ``q_sweep_<task>.png`` (accuracy against Q, the paper's Figure 4).

Examples (CPU, offline):
    python benchmarks/accuracy.py                                  # both tasks, 3 methods, 3 seeds
    python benchmarks/accuracy.py --task vision --q_sweep 0,0.1,0.2,0.4,0.6,0.8 --methods prune
    python benchmarks/accuracy.py --task text --steps 2000 --dense_steps 3000 --text_train 0   # larger, e.g. on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hf_vcon from this checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_vcon import VConConfig, VConTrainer  # noqa: E402
from hf_vcon.compressors import compressor_class  # noqa: E402
from report import plot_regimes, write_q_sweep, write_table  # noqa: E402
from tasks import build_task  # noqa: E402

# Per-task defaults; every one is a flag.
DEFAULTS = {
    "vision": dict(steps=100, dense_steps=1500, lr=1e-3, dense_lr=1e-3, batch_size=64, eval_every=10),
    "text": dict(steps=300, dense_steps=300, lr=2e-4, dense_lr=5e-5, batch_size=16, eval_every=50),
}
METHOD_SETTINGS = {"prune": "sparsity", "binary": None, "lowrank": "rank_ratio", "structured": "neuron_sparsity"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="vision,text", help="comma list of: vision, text")
    parser.add_argument("--methods", default="prune,binary,lowrank")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--transition", type=float, default=0.2, help="VCON / GMP Q as a fraction of --steps")
    parser.add_argument("--schedule", default="linear", help="β schedule of the VCON arm: linear, cosine, cubic")
    parser.add_argument("--steps", type=int, help="optimizer steps of every compression arm (task default)")
    parser.add_argument("--dense_steps", type=int, help="optimizer steps of the dense training (task default)")
    parser.add_argument("--lr", type=float, help="peak learning rate of the compression arms (task default)")
    parser.add_argument("--dense_lr", type=float)
    parser.add_argument("--lr_scheduler", default="cosine", help="Trainer lr_scheduler_type of every arm")
    parser.add_argument("--warmup_steps", type=int, default=0)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--eval_every", type=int, help="steps between the evaluations drawn as curves")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rank_ratio", type=float, default=1 / 12, help="lowrank r / min(in, out) (paper: 16/192)")
    parser.add_argument("--neuron_sparsity", type=float, default=0.5, help="structured: the MLP neurons removed")
    parser.add_argument("--text_model", default="", help="a local model folder (default: the MiniLM-L6 wheel)")
    parser.add_argument("--text_train", type=int, default=4000, help="training snippets (0 = all ~11.5k)")
    parser.add_argument("--text_test", type=int, default=500, help="test snippets (the final numbers)")
    parser.add_argument("--text_validation", type=int, default=128, help="validation snippets (the curves)")
    parser.add_argument("--text_max_length", type=int, default=32, help="tokens per snippet (mean is 27)")
    parser.add_argument("--q_sweep", default="", help="comma list of Q fractions: VCON at each (paper Fig. 4)")
    parser.add_argument("--no_gmp", action="store_true", help="skip the GMP arm")
    parser.add_argument("--regimes", action="store_true",
                        help="train nothing: draw regimes_<task>.png, VCON's gain over post-shot against Q for every "
                             "budget, schedule and lr in results.jsonl")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: redraw the tables and pictures from the runs already in results.jsonl")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", default="", help="kept with every run, to tell sweeps apart in results.jsonl")
    return parser.parse_args(argv)


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def training_args(out: str, steps: int, lr: float, args, seed: int, eval_every: int) -> TrainingArguments:
    return TrainingArguments(
        out, max_steps=steps, learning_rate=lr, lr_scheduler_type=args.lr_scheduler, warmup_steps=args.warmup_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=256, weight_decay=0.01,
        eval_strategy="steps" if eval_every else "no", eval_steps=eval_every or None, logging_steps=eval_every or 50,
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, dataloader_num_workers=0,
    )


def dense_model(task, args) -> tuple[dict, float]:
    """Train (or load from --out) the dense starting point of every arm; returns its state dict and test accuracy."""
    path = os.path.join(args.out, f"dense_{task.name}.pt")
    if os.path.exists(path):
        saved = torch.load(path)
        return saved["state_dict"], saved["test_accuracy"]
    torch.manual_seed(0)
    model = task.build_model()
    trainer = Trainer(model=model, args=training_args(os.path.join(args.out, "tmp"), args.dense_steps, args.dense_lr,
                                                      args, 0, 0),
                      train_dataset=task.train, data_collator=task.collator, compute_metrics=accuracy)
    trainer.train()
    test_accuracy = trainer.evaluate(task.test)["eval_accuracy"]
    state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}
    torch.save({"state_dict": state_dict, "test_accuracy": test_accuracy}, path)
    print(f"[{task.name}] dense: test accuracy {test_accuracy:.4f}", flush=True)
    return state_dict, test_accuracy


def vcon_config(method: str, arm: str, q: float, args) -> VConConfig:
    options = compression_setting(method, args)
    if arm == "post-shot":
        return VConConfig(method=method, transition_steps=0, **options)
    if arm == "gmp":
        return VConConfig(method=method, transition="gmp", transition_steps=q, **options)
    return VConConfig(method=method, transition_steps=q, schedule=args.schedule, **options)


def curve(history: list[dict]) -> list[dict]:
    """(step, compressed-model accuracy, β, sparsity) at every evaluation during training."""
    points = []
    for entry in history:
        if "eval_accuracy" not in entry:
            continue
        compressed = entry.get("eval_compressed_accuracy", entry["eval_accuracy"])  # β = 0: the eval itself
        points.append({"step": entry["step"], "accuracy": compressed, "blended_accuracy": entry["eval_accuracy"],
                       "beta": entry.get("vcon/beta"), "sparsity": entry.get("vcon/sparsity")})
    return points


def run_arm(task, state_dict, method: str, arm: str, q: float, seed: int, args) -> dict:
    torch.manual_seed(seed)
    model = task.build_model()
    model.load_state_dict(state_dict)
    config = vcon_config(method, arm, q, args)
    trainer = VConTrainer(model=model, args=training_args(os.path.join(args.out, "tmp"), args.steps, args.lr, args,
                                                          seed, args.eval_every),
                          vcon_config=config, train_dataset=task.train, eval_dataset=task.validation,
                          data_collator=task.collator, compute_metrics=accuracy)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    trainer.evaluate_compressed = False  # β = 0 now: the evaluation is the compressed model
    final = trainer.evaluate(task.test, metric_key_prefix="test")
    return {"task": task.name, "method": method, "arm": arm, "q": q if arm != "post-shot" else 0.0, "seed": seed,
            "schedule": args.schedule if arm == "vcon" else None, "steps": args.steps, "lr": args.lr,
            "lr_scheduler": args.lr_scheduler, "batch_size": args.batch_size, "tag": args.tag,
            **compression_setting(method, args),
            "test_accuracy": final["test_accuracy"], "final_beta": trainer.vcon_callback.log_values()["vcon/beta"],
            "train_seconds": round(seconds, 1), "curve": curve(trainer.state.log_history)}


def compression_setting(method: str, args) -> dict:
    """The flag that sets how hard ``method`` compresses (kept with every run, part of its key)."""
    flag = METHOD_SETTINGS[method]
    return {flag: getattr(args, flag)} if flag else {}


def arm_plan(methods: list[str], sweep, args) -> list[tuple[str, str, float]]:
    """(method, arm, Q) of every run per seed: the Q sweep, or post-shot, VCON and (methods with a gradual option) GMP."""
    plan = []
    for method in methods:
        if sweep:
            plan += [(method, "post-shot" if q == 0 else "vcon", q) for q in sweep]
        else:
            plan += [(method, "post-shot", 0.0), (method, "vcon", args.transition)]
            if compressor_class(method).gradual_option is not None and not args.no_gmp:
                plan.append((method, "gmp", args.transition))
    return plan


def settings_text(methods: list[str], args) -> str:
    """The compression settings of the methods run, for the table's header."""
    shown = {"prune": f"prune sparsity {args.sparsity}", "lowrank": f"lowrank rank_ratio {args.rank_ratio:.4g}",
             "structured": f"structured neuron_sparsity {args.neuron_sparsity:g}"}
    return "".join(f"{shown[method]}, " for method in methods if method in shown)


def run_key(record: dict) -> tuple:
    setting = record.get("sparsity", record.get("rank_ratio", record.get("neuron_sparsity")))
    return (record["task"], record["method"], record["arm"], round(record["q"], 6), record["seed"], record["schedule"],
            record["steps"], record["lr"], record["lr_scheduler"], record.get("tag", ""),
            None if setting is None else round(setting, 6))


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    hf_logging.set_verbosity_error()
    results_path = os.path.join(args.out, "results.jsonl")
    done = {}
    if os.path.exists(results_path):
        with open(results_path) as handle:
            for line in handle:
                record = json.loads(line)
                done[run_key(record)] = record
    seeds = [int(seed) for seed in args.seeds.split(",")]
    methods = args.methods.split(",")
    sweep = [float(q) for q in args.q_sweep.split(",")] if args.q_sweep else []
    base = {key: getattr(args, key) for key in DEFAULTS["vision"]}
    if args.regimes:
        for task_name in args.task.split(","):
            runs = [record for record in done.values() if record["task"] == task_name]
            print(plot_regimes(runs, args.out, task_name) if runs else f"[{task_name}] no runs in {results_path}")
        return
    for task_name in args.task.split(","):
        for key, value in DEFAULTS[task_name].items():
            setattr(args, key, base[key] if base[key] is not None else value)
        task = build_task(task_name, **({"model_path": args.text_model, "n_train": args.text_train,
                                         "n_test": args.text_test, "n_validation": args.text_validation,
                                         "max_length": args.text_max_length} if task_name == "text" else {}))
        print(f"[{task_name}] {task.description}", flush=True)
        state_dict, dense_accuracy = (None, None) if args.report_only else dense_model(task, args)
        plan = arm_plan(methods, sweep, args)
        records = []
        for seed in seeds:
            for method, arm, q in plan:
                probe = {"task": task_name, "method": method, "arm": arm, "q": q, "seed": seed,
                         "schedule": args.schedule if arm == "vcon" else None, "steps": args.steps, "lr": args.lr,
                         "lr_scheduler": args.lr_scheduler, "tag": args.tag, **compression_setting(method, args)}
                record = done.get(run_key(probe))
                if record is None and args.report_only:
                    continue
                if record is None:
                    record = run_arm(task, state_dict, method, arm, q, seed, args)
                    record["dense_accuracy"] = dense_accuracy
                    with open(results_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    print(f"[{task_name}] {method:8s} {arm:9s} Q={q:<5} seed {seed}: "
                          f"{record['test_accuracy']:.4f} ({record['train_seconds']} s)", flush=True)
                records.append(record)
        if not records:
            continue
        dense_accuracy = records[0]["dense_accuracy"]
        header = (f"{task.description}; every arm {args.steps} optimizer steps, batch {args.batch_size}, "
                  f"AdamW lr {args.lr} ({args.lr_scheduler}), {settings_text(methods, args)}"
                  f"seeds {','.join(str(seed) for seed in sorted({r['seed'] for r in records}))}")
        if sweep:
            name = f"{args.steps} steps {args.schedule} lr {args.lr:g}"
            write_q_sweep(records, dense_accuracy, args.out, task_name, header + f"; {args.schedule} β", name)
        else:
            write_table(records, dense_accuracy, args.out, task_name, header, args.transition, args.schedule)


if __name__ == "__main__":
    main()
