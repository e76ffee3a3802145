"""Accuracy evidence: post-shot vs VCON vs gradual magnitude pruning (GMP) or round-to-nearest quantization without
fine-tuning (PTQ), on real data, in one command.

For each task and method, every arm starts from the same dense trained model and fine-tunes the compressed model
with the same data, budget (optimizer steps), learning rate schedule and seeds; only the transition differs:

- ``post-shot``: ``transition_steps=0`` (compress at once, then fine-tune);
- ``vcon``:      ``transition_steps=Q`` (β from 1 to 0 over Q steps, then fine-tune the compressed model);
- ``gmp``:       methods with a gradual option (prune, structured), ``transition="gmp"``: a hard mask whose
                 sparsity rises as s·(1 − (1 − t/Q)³);
- ``ptq``:       quant only, the dense model quantized (round to nearest, absmax scales) with no training at all;
- ``dense+``     (``--dense_plus``): the dense model trained for the same steps with the same recipe and no
                 compression, the reference with the same training budget as the trained arms; with ``--kd`` also
                 ``dense+kd``, the same distilling from the dense model (itself), the reference of the distilled arms.

``--methods quant`` runs each of ``--quant_settings`` (bits:strategy, or a compressed-tensors preset name such as
NVFP4A16 or W4A16) as a method of its own; with a preset, a table of the share of the PTQ → dense (and PTQ →
dense+) perplexity gap each arm closes is written too. The ``clm`` task reports
perplexity (lower is better) instead of accuracy.
- ``post-shot+kd``, ``vcon+kd`` (``--kd``): the same two arms distilling from the dense model
  (``(1 − α)·task + α·T²·KL``); its logits on the training set are computed once per task, saved in ``--out``
  (``teacher_logits_<task>.safetensors``, float16) and read by every distilled arm and seed.

The final number of every arm is the test accuracy of the compressed model (β = 0, full compression) after the
last step; there is no early stopping or checkpoint selection. Outputs in ``--out``: ``results.jsonl`` (one line per
run, with its curve; runs already there are skipped, so an interrupted sweep resumes), ``accuracy.md`` (mean ± std
over seeds) and ``curves_<task>.png`` (compressed-model accuracy and β against the step); with ``--q_sweep``,
``q_sweep.md`` and ``q_sweep_<task>.png`` (accuracy against Q, the paper's Figure 4).

Examples (CPU, offline):
    python benchmarks/accuracy.py                                  # both tasks, 3 methods, 3 seeds
    python benchmarks/accuracy.py --task vision --q_sweep 0,0.1,0.2,0.4,0.6,0.8 --methods prune
    python benchmarks/accuracy.py --task text --steps 2000 --dense_steps 3000 --text_train 0   # larger, e.g. on a GPU
    python benchmarks/accuracy.py --task clm,vision --methods quant --seeds 0,1,2       # PTQ / post-shot / VCON
    python benchmarks/accuracy.py --task vision --kd --kd_alpha 0.9 --kd_temperature 2   # + the distilled arms
    python benchmarks/accuracy.py --task clm --methods quant --quant_settings NVFP4A16,W4A16 --kd --dense_plus
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

from hf_vcon import (  # noqa: E402
    DistillationConfig,
    DistillationMixin,
    VConConfig,
    VConTrainer,
    add_teacher_index,
    apply_vcon,
    cache_teacher_logits,
    set_beta,
)
from hf_vcon.compressors import compressor_class  # noqa: E402
from report import (  # noqa: E402
    plot_regimes,
    write_gap_table,
    write_kd_table,
    write_q_sweep,
    write_quant_table,
    write_table,
)
from tasks import build_task  # noqa: E402

# Per-task defaults; every one is a flag.
DEFAULTS = {
    "vision": dict(steps=100, dense_steps=1500, lr=1e-3, dense_lr=1e-3, batch_size=64, eval_every=10, group_size=32,
                   eval_batch_size=256),
    "text": dict(steps=300, dense_steps=300, lr=2e-4, dense_lr=5e-5, batch_size=16, eval_every=50, group_size=128,
                 eval_batch_size=256),
    "clm": dict(steps=150, dense_steps=1000, lr=5e-4, dense_lr=2e-3, batch_size=16, eval_every=25, group_size=128,
                eval_batch_size=32),
}
METHOD_SETTINGS = {"prune": "sparsity", "binary": None, "lowrank": "rank_ratio", "quant": None,
                   "structured": "neuron_sparsity"}
QUANT_KEYS = ("bits", "strategy", "group_size", "clip_search", "scheme")
# The clm teacher's cached logits would be ~22 GB (20k blocks × 128 tokens × 4,096 vocab in float16): run it live.
KD_TEACHER = {"vision": "cached", "text": "cached", "clm": "live"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="vision,text", help="comma list of: vision, text")
    parser.add_argument("--methods", default="prune,binary,lowrank")
    parser.add_argument("--seeds", default=None,
                        help="comma list (default 0,1,2; with --report_only: every seed recorded for the task)")
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
    parser.add_argument("--quant_settings", default="4:channel,4:group,3:channel,3:group,2:channel,2:group",
                        help="quant: comma list of bits:strategy or compressed-tensors preset names (NVFP4A16, "
                             "W4A16, ...), each a method of its own")
    parser.add_argument("--group_size", type=int, help="quant: inputs per scale with strategy group (task default)")
    parser.add_argument("--clip_search", action="store_true", help="quant: least-squares clipping instead of absmax")
    parser.add_argument("--eval_batch_size", type=int)
    parser.add_argument("--arms", default="",
                        help="comma list: run only these arms (post-shot, vcon, gmp, ptq, post-shot+kd, vcon+kd, dense+, "
                             "dense+kd)")
    parser.add_argument("--neuron_sparsity", type=float, default=0.5, help="structured: the MLP neurons removed")
    parser.add_argument("--text_model", default="", help="a local model folder (default: the MiniLM-L6 wheel)")
    parser.add_argument("--text_train", type=int, default=4000, help="training snippets (0 = all ~11.5k)")
    parser.add_argument("--text_test", type=int, default=500, help="test snippets (the final numbers)")
    parser.add_argument("--text_validation", type=int, default=128, help="validation snippets (the curves)")
    parser.add_argument("--text_max_length", type=int, default=32, help="tokens per snippet (mean is 27)")
    parser.add_argument("--q_sweep", default="", help="comma list of Q fractions: VCON at each (paper Fig. 4)")
    parser.add_argument("--no_gmp", action="store_true", help="skip the GMP arm")
    parser.add_argument("--kd", action="store_true", help="add post-shot+kd and vcon+kd: distil from the dense model")
    parser.add_argument("--kd_only", action="store_true", help="with --kd: run the distilled arms only (the others "
                                                                  "are read from results.jsonl for the table)")
    parser.add_argument("--kd_alpha", type=float, default=0.9, help="α of the distilled arms")
    parser.add_argument("--kd_temperature", type=float, default=2.0, help="T of the distilled arms")
    parser.add_argument("--kd_teacher", choices=("cached", "live"),
                        help="the distilled arms' teacher: its logits cached once, or run at every step (task default: "
                             "live for clm, whose cache would not fit in memory)")
    parser.add_argument("--dense_plus", action="store_true",
                        help="quant: add the dense+ arm (the dense model trained with the arms' recipe, uncompressed; "
                             "with --kd also dense+kd, distilling from itself)")
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


def metric_of(metrics: dict, prefix: str, metric: str) -> float:
    """The task's metric from a Trainer's metrics: ``<prefix>_accuracy``, or perplexity = exp(``<prefix>_loss``)."""
    return metrics[f"{prefix}_accuracy"] if metric == "accuracy" else float(np.exp(metrics[f"{prefix}_loss"]))


def compute_metrics_of(task):
    return accuracy if task.metric == "accuracy" else None


def training_args(out: str, steps: int, lr: float, args, seed: int, eval_every: int) -> TrainingArguments:
    return TrainingArguments(
        out, max_steps=steps, learning_rate=lr, lr_scheduler_type=args.lr_scheduler, warmup_steps=args.warmup_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size, weight_decay=0.01,
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
    teacher_cache = teacher_logits_path(task, args)
    if os.path.exists(teacher_cache):
        os.remove(teacher_cache)  # cached from a dense model that is no longer there
    torch.manual_seed(0)
    model = task.build_model()
    trainer = Trainer(model=model, args=training_args(os.path.join(args.out, "tmp"), args.dense_steps, args.dense_lr,
                                                      args, 0, 0),
                      train_dataset=task.train, data_collator=task.collator, compute_metrics=compute_metrics_of(task))
    trainer.train()
    test_accuracy = metric_of(trainer.evaluate(task.test), "eval", task.metric)
    state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}
    torch.save({"state_dict": state_dict, "test_accuracy": test_accuracy}, path)
    print(f"[{task.name}] dense: test {task.metric} {test_accuracy:.4f}", flush=True)
    return state_dict, test_accuracy


class DistillingTrainer(DistillationMixin, Trainer):
    """A plain Trainer with the distillation loss: the dense+kd arm, which compresses nothing."""


def dense_teacher(task, state_dict: dict) -> torch.nn.Module:
    teacher = task.build_model()
    teacher.load_state_dict(state_dict)
    return teacher


def teacher_logits_path(task, args) -> str:
    return os.path.join(args.out, f"teacher_logits_{task.name}.safetensors")


def teacher_logits(task, state_dict: dict, args) -> str:
    """The dense model's logits on the training set, computed once (then read by every distilled arm and seed)."""
    path = teacher_logits_path(task, args)
    if not os.path.exists(path):
        teacher = task.build_model()
        teacher.load_state_dict(state_dict)
        start = time.time()
        cache_teacher_logits(teacher.eval(), task.train, path, data_collator=task.collator, batch_size=64,
                             dtype=torch.float16)
        print(f"[{task.name}] teacher logits of {len(task.train)} training examples cached in "
              f"{time.time() - start:.1f} s: {path}", flush=True)
    return path


def vcon_config(method: str, arm: str, q: float, args, options: dict) -> VConConfig:
    arm = arm.replace("+kd", "")
    if arm in ("post-shot", "ptq"):
        return VConConfig(method=method, transition_steps=0, **options)
    if arm == "gmp":
        return VConConfig(method=method, transition="gmp", transition_steps=q, **options)
    return VConConfig(method=method, transition_steps=q, schedule=args.schedule, **options)


def curve(history: list[dict], metric: str = "accuracy") -> list[dict]:
    """(step, compressed-model metric, β, sparsity) at every evaluation during training (key ``accuracy`` holds the
    task's metric)."""
    points = []
    name = "accuracy" if metric == "accuracy" else "loss"
    for entry in history:
        if f"eval_{name}" not in entry:
            continue
        compressed = "eval_compressed" if f"eval_compressed_{name}" in entry else "eval"  # β = 0: the eval itself
        points.append({"step": entry["step"], "accuracy": metric_of(entry, compressed, metric),
                       "blended_accuracy": metric_of(entry, "eval", metric),
                       "beta": entry.get("vcon/beta"), "sparsity": entry.get("vcon/sparsity")})
    return points


def run_arm(task, state_dict, method: str, arm: str, q: float, seed: int, args, options: dict) -> dict:
    torch.manual_seed(seed)
    model = task.build_model()
    model.load_state_dict(state_dict)
    config = vcon_config(method, arm, q, args, options)
    arguments = training_args(os.path.join(args.out, "tmp"), args.steps, args.lr, args, seed, args.eval_every)
    start = time.time()
    if arm == "ptq":  # no training: the dense model, quantized
        trainer = Trainer(model=apply_vcon(model, config), args=arguments, eval_dataset=task.validation,
                          data_collator=task.collator, compute_metrics=compute_metrics_of(task))
        set_beta(trainer.model, 0.0)
        final_beta, history = 0.0, []
    elif arm in ("dense+", "dense+kd"):  # the same recipe with nothing compressed
        distillation = DistillationConfig(alpha=args.kd_alpha, temperature=args.kd_temperature,
                                          teacher=dense_teacher(task, state_dict)) if arm == "dense+kd" else None
        trainer = DistillingTrainer(model=model, args=arguments, train_dataset=task.train, eval_dataset=task.validation,
                                    data_collator=task.collator, compute_metrics=compute_metrics_of(task),
                                    distillation=distillation)
        trainer.train()
        final_beta, history = None, trainer.state.log_history
    else:
        distills = arm.endswith("+kd")
        live = args.kd_teacher == "live"
        distillation = DistillationConfig(alpha=args.kd_alpha, temperature=args.kd_temperature,
                                          teacher=dense_teacher(task, state_dict) if live else None,
                                          teacher_logits=None if live else teacher_logits(task, state_dict, args)
                                          ) if distills else None
        trainer = VConTrainer(model=model, args=arguments, vcon_config=config,
                              train_dataset=add_teacher_index(task.train) if distills and not live else task.train,
                              eval_dataset=task.validation, data_collator=task.collator,
                              compute_metrics=compute_metrics_of(task), distillation=distillation)
        start = time.time()  # the teacher's logits are cached once, outside any arm's time
        trainer.train()
        trainer.evaluate_compressed = False  # β = 0 now: the evaluation is the compressed model
        final_beta, history = trainer.vcon_callback.log_values()["vcon/beta"], trainer.state.log_history
    seconds = time.time() - start
    final = metric_of(trainer.evaluate(task.test, metric_key_prefix="test"), "test", task.metric)
    record = {"task": task.name, "method": method, "arm": arm,
              "q": 0.0 if arm in ("ptq", "post-shot", "post-shot+kd", "dense+", "dense+kd") else q,
              "seed": seed, "schedule": args.schedule if arm.startswith("vcon") else None, "steps": args.steps,
              "lr": args.lr, "lr_scheduler": args.lr_scheduler, "batch_size": args.batch_size, "tag": args.tag,
              **options, **kd_setting(arm, args), "metric": task.metric, "test_metric": final, "final_beta": final_beta,
              "train_seconds": round(seconds, 1), "curve": curve(history, task.metric)}
    if task.metric == "accuracy":
        record["test_accuracy"] = final
    return record


def compression_settings(method: str, args) -> list[dict]:
    """The options that set how hard ``method`` compresses, one dict per setting (kept with every run, part of its
    key): prune's sparsity, lowrank's rank_ratio, one per ``--quant_settings`` entry for quant."""
    if method == "quant":
        settings = []
        for item in args.quant_settings.split(","):
            if ":" not in item:  # a compressed-tensors preset name: it sets the whole format
                settings.append({"scheme": item})
                continue
            bits, strategy = item.split(":")
            settings.append({"bits": int(bits), "strategy": strategy,
                             "group_size": args.group_size if strategy == "group" else None,
                             "clip_search": args.clip_search})
        return settings
    flag = METHOD_SETTINGS[method]
    return [{flag: getattr(args, flag)} if flag else {}]


def vcon_options(options: dict) -> dict:
    return {key: value for key, value in options.items() if value is not None}


def kd_setting(arm: str, args) -> dict:
    """α and T of a distilled arm (kept with the run, part of its key)."""
    if not arm.endswith("+kd"):
        return {}
    live = {"kd_teacher": "live"} if args.kd_teacher == "live" or arm == "dense+kd" else {}  # absent: cached, as older runs recorded
    return {"kd_alpha": args.kd_alpha, "kd_temperature": args.kd_temperature, **live}


def settings_text(methods: list[str], args) -> str:
    """The compression settings of the methods run, for the table's header."""
    shown = {"prune": f"prune sparsity {args.sparsity}", "lowrank": f"lowrank rank_ratio {args.rank_ratio:.4g}",
             "structured": f"structured neuron_sparsity {args.neuron_sparsity:g}"}
    return "".join(f"{shown[method]}, " for method in methods if method in shown)


def run_key(record: dict) -> tuple:
    setting = record.get("sparsity", record.get("rank_ratio", record.get("neuron_sparsity")))
    return (record["task"], record["method"], record["arm"], round(record["q"], 6), record["seed"], record["schedule"],
            record["steps"], record["lr"], record["lr_scheduler"], record.get("tag", ""),
            None if setting is None else round(setting, 6), *(record.get(key) for key in QUANT_KEYS),
            record.get("kd_alpha"), record.get("kd_temperature"), record.get("kd_teacher"))


def read_runs(results_path: str) -> dict:
    done = {}
    if os.path.exists(results_path):
        with open(results_path) as handle:
            for line in handle:
                record = json.loads(line)
                done[run_key(record)] = record
    return done


def make_plan(methods: list[str], sweep: list[float], args) -> list[tuple]:
    """``(method, arm, q, options)`` of every run a seed gets."""
    plan = []
    for method in methods:
        if method == "quant" and args.dense_plus:
            plan.append((method, "dense+", 0.0, {}))  # once per seed: it compresses nothing
            if args.kd:
                plan.append((method, "dense+kd", 0.0, {}))
        for options in compression_settings(method, args):
            if sweep:
                plan += [(method, "post-shot" if q == 0 else "vcon", q, options) for q in sweep]
                continue
            plan += [(method, "post-shot", 0.0, options), (method, "vcon", args.transition, options)]
            if compressor_class(method).gradual_option is not None and not args.no_gmp:
                plan.append((method, "gmp", args.transition, options))
            if method == "quant":
                plan.append((method, "ptq", 0.0, options))
            if args.kd:
                plan += [(method, "post-shot+kd", 0.0, options), (method, "vcon+kd", args.transition, options)]
    return [entry for entry in plan if not args.arms or entry[1] in args.arms.split(",")]


def run_plan(task, plan: list[tuple], seeds: list[int], done: dict, dense: tuple, args, results_path: str) -> list[dict]:
    """Every run of the plan for every seed (PTQ, deterministic, for the first only), reusing recorded ones."""
    state_dict, dense_accuracy = dense
    records = []
    for seed in seeds:
        for method, arm, q, options in plan:
            if arm == "ptq" and seed != seeds[0]:
                continue
            probe = {"task": task.name, "method": method, "arm": arm, "q": q, "seed": seed,
                     "schedule": args.schedule if arm.startswith("vcon") else None, "steps": args.steps,
                     "lr": args.lr, "lr_scheduler": args.lr_scheduler, "tag": args.tag, **options,
                     **kd_setting(arm, args)}
            record = done.get(run_key(probe))
            if record is None and (args.report_only or (args.kd_only and not arm.endswith("+kd"))):
                continue
            if record is None:
                record = run_arm(task, state_dict, method, arm, q, seed, args, vcon_options(options))
                record.update(options, dense_accuracy=dense_accuracy)
                with open(results_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(f"[{task.name}] {method:8s} {arm:9s} Q={q:<5} seed {seed} {vcon_options(options)}: "
                      f"{record.get('test_metric', record.get('test_accuracy')):.4f} ({record['train_seconds']} s)",
                      flush=True)
            records.append(record)
    return records


def write_reports(task, records: list[dict], sweep: list[float], args) -> None:
    dense_accuracy = records[0]["dense_accuracy"]
    seeds_of = lambda runs: ",".join(str(seed) for seed in sorted({r["seed"] for r in runs}))  # noqa: E731
    quant = [record for record in records if record["method"] == "quant"]
    records = [record for record in records if record["method"] != "quant"]
    presets = [r for r in quant if r.get("scheme") or r["arm"].startswith("dense+")]
    quant = [r for r in quant if r.get("bits") is not None and "+kd" not in r["arm"]]
    if presets and task.metric == "perplexity":
        kd = f"; distilled arms α = {args.kd_alpha:g}, T = {args.kd_temperature:g} ({args.kd_teacher} teacher)"
        header = (f"{task.description}; every trained arm (dense+ included) {args.steps} optimizer steps, batch "
                  f"{args.batch_size}, AdamW lr {args.lr} ({args.lr_scheduler}), Q = {args.transition:g} of the run "
                  f"({args.schedule} β){kd if args.kd else ''}; seeds {seeds_of(presets)}")
        write_gap_table(presets, dense_accuracy, args.out, task.name, header, f"{args.steps} steps lr {args.lr:g}")
    if quant:
        clip = " clip search" if args.clip_search else ""
        header = (f"{task.description}; every trained arm {args.steps} optimizer steps, batch {args.batch_size}, "
                  f"AdamW lr {args.lr} ({args.lr_scheduler}), Q = {args.transition:g} of the run ({args.schedule} "
                  f"β); group size {args.group_size}{clip.replace(' ', ', ', 1)}; seeds {seeds_of(quant)}")
        write_quant_table(quant, dense_accuracy, args.out, task.name, header, task.metric,
                          f"{args.steps} steps lr {args.lr:g}{clip}")
    if not records:
        return
    header = (f"{task.description}; every arm {args.steps} optimizer steps, batch {args.batch_size}, "
              f"AdamW lr {args.lr} ({args.lr_scheduler}), "
              f"{settings_text(list(dict.fromkeys(r['method'] for r in records)), args)}seeds {seeds_of(records)}")
    if sweep:
        name = f"{args.steps} steps {args.schedule} lr {args.lr:g}"
        write_q_sweep(records, dense_accuracy, args.out, task.name, header + f"; {args.schedule} β", name)
    else:
        write_table([r for r in records if "+kd" not in r["arm"]], dense_accuracy, args.out, task.name, header,
                    args.transition, args.schedule)
        if any(r["arm"].endswith("+kd") for r in records):
            write_kd_table(records, dense_accuracy, args.out, task.name,
                           header + f"; distilled arms α = {args.kd_alpha:g}, T = {args.kd_temperature:g}",
                           args.transition, args.schedule)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    hf_logging.set_verbosity_error()
    results_path = os.path.join(args.out, "results.jsonl")
    done = read_runs(results_path)
    seeds = [int(seed) for seed in (args.seeds or "0,1,2").split(",")]
    sweep = [float(q) for q in args.q_sweep.split(",")] if args.q_sweep else []
    base = {key: getattr(args, key) for key in DEFAULTS["vision"]}
    kd_teacher = args.kd_teacher
    if args.regimes:
        for task_name in args.task.split(","):
            runs = [record for record in done.values() if record["task"] == task_name]
            print(plot_regimes(runs, args.out, task_name) if runs else f"[{task_name}] no runs in {results_path}")
        return
    for task_name in args.task.split(","):
        for key, value in DEFAULTS[task_name].items():
            setattr(args, key, base[key] if base[key] is not None else value)
        args.kd_teacher = kd_teacher or KD_TEACHER[task_name]
        task = build_task(task_name, **({"model_path": args.text_model, "n_train": args.text_train,
                                         "n_test": args.text_test, "n_validation": args.text_validation,
                                         "max_length": args.text_max_length} if task_name == "text" else {}))
        print(f"[{task_name}] {task.description}", flush=True)
        dense = (None, None) if args.report_only else dense_model(task, args)
        if args.report_only and args.seeds is None:  # redraw from every run recorded, not a default subset
            seeds = sorted({record["seed"] for record in done.values() if record["task"] == task_name})
        records = run_plan(task, make_plan(args.methods.split(","), sweep, args), seeds, done, dense, args, results_path)
        if records:
            write_reports(task, records, sweep, args)


if __name__ == "__main__":
    main()
