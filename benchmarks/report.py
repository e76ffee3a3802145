"""Tables (Markdown) and pictures (PNG, matplotlib) from the benchmark's run records."""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict

import numpy as np

ARMS = ("post-shot", "vcon", "gmp")
COLORS = {"post-shot": "tab:gray", "vcon": "tab:blue", "gmp": "tab:orange"}


def _pm(values: list[float]) -> str:
    if not values:
        return "—"
    values = 100 * np.asarray(values)
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _paired_gain(by_seed_a: dict, by_seed_b: dict) -> str:
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if not seeds:
        return "—"
    gains = [by_seed_a[s] - by_seed_b[s] for s in seeds]
    wins = f", better on {sum(g > 0 for g in gains)}/{len(gains)}" if len(gains) > 1 else ""
    return f"{'+' if np.mean(gains) >= 0 else ''}{_pm(gains)}{wins}"


def _section(path: str, marker: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- marker -->`` lines of a Markdown file."""
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text += ("\n" if text else "") + block
    with open(path, "w") as handle:
        handle.write(text)


def write_table(records: list[dict], dense: float, out: str, task: str, header: str, q: float, schedule: str) -> None:
    accuracy = defaultdict(dict)  # (method, arm) -> {seed: acc}
    for record in records:
        accuracy[(record["method"], record["arm"])][record["seed"]] = record["test_accuracy"]
    methods = list(dict.fromkeys(record["method"] for record in records))
    lines = [f"**{task}** — {header}; Q = {q:g} of the run ({schedule} β). Test accuracy (%) of the compressed "
             "model after the last step, mean ± std over seeds; gains are per-seed paired differences, with the "
             "number of seeds on which VCON is better.", "",
             "| method | dense | post-shot | VCON | GMP | gain VCON − post-shot | gain VCON − GMP |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        post, vcon, gmp = (accuracy.get((method, arm), {}) for arm in ARMS)
        lines.append(f"| {method} | {100 * dense:.2f} | {_pm(list(post.values()))} | {_pm(list(vcon.values()))} | "
                     f"{_pm(list(gmp.values()))} | {_paired_gain(vcon, post)} | {_paired_gain(vcon, gmp)} |")
    _section(os.path.join(out, "accuracy.md"), f"table {task}", "\n".join(lines) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        print(f"[{task}] matplotlib is not installed: no curves_{task}.png (the table is written)", flush=True)
        return
    plot_curves(records, out, task, dense)


def _quant_label(record: dict) -> str:
    if record.get("scheme"):
        return record["scheme"]
    strategy = f"group {record['group_size']}" if record["strategy"] == "group" else record["strategy"]
    return f"int{record['bits']} {strategy}" + (" (clip search)" if record.get("clip_search") else "")


def _values(by_seed: dict, metric: str, deterministic: bool = False) -> str:
    values = list(by_seed.values())
    if deterministic and values:
        return f"{100 * values[0]:.2f}" if metric == "accuracy" else f"{values[0]:.2f}"
    if metric == "accuracy":
        return _pm(values)
    if not values:
        return "—"
    return f"{values[0]:.2f} (1 seed)" if len(values) == 1 else f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _gain(vcon: dict, base: dict, metric: str) -> str:
    """VCON's paired gain over ``base`` in the metric's units (accuracy points; perplexity: base − VCON, so that
    positive is better for VCON in both), with the seeds on which VCON is better."""
    seeds = sorted(set(vcon) & set(base))
    if not seeds:
        return "—"
    if metric == "accuracy":
        return _paired_gain(vcon, base)
    gains = [base[s] - vcon[s] for s in seeds]
    wins = f", better on {sum(g > 0 for g in gains)}/{len(gains)}" if len(gains) > 1 else ""
    spread = f" ± {np.std(gains, ddof=1):.2f}" if len(gains) > 1 else " (1 seed)"
    return f"{'+' if np.mean(gains) >= 0 else ''}{np.mean(gains):.2f}{spread}{wins}"


def write_quant_table(records: list[dict], dense: float, out: str, task: str, header: str, metric: str,
                      name: str = "") -> None:
    """One row per quantization setting: dense, PTQ (no training), post-shot, VCON, and VCON's paired gains.

    ``name`` tells budgets apart (steps, learning rate, clipping): it keys the Markdown section."""
    runs = defaultdict(dict)  # (setting, arm) -> {seed: value}
    for record in records:
        runs[(_quant_label(record), record["arm"])][record["seed"]] = record.get("test_metric", record.get("test_accuracy"))
    settings = list(dict.fromkeys(_quant_label(record) for record in records))
    unit = "test accuracy (%)" if metric == "accuracy" else "test perplexity (lower is better)"
    dense_text = f"{100 * dense:.2f}" if metric == "accuracy" else f"{dense:.2f}"
    lines = [f"**{task}, quantization** — {header}. {unit[0].upper() + unit[1:]} of the quantized model after the last "
             "step, mean ± std over seeds (PTQ is deterministic: one run); gains are per-seed paired differences "
             "(positive: VCON better), with the number of seeds on which VCON is better.", "",
             "| setting | dense | PTQ | post-shot | VCON | gain VCON vs post-shot | gain VCON vs PTQ |",
             "|---|---|---|---|---|---|---|"]
    for setting in settings:
        ptq, post, vcon = (runs.get((setting, arm), {}) for arm in ("ptq", "post-shot", "vcon"))
        ptq_all = {seed: next(iter(ptq.values())) for seed in vcon} if ptq else {}
        lines.append(f"| {setting} | {dense_text} | {_values(ptq, metric, deterministic=True)} | {_values(post, metric)} | "
                     f"{_values(vcon, metric)} | {_gain(vcon, post, metric)} | {_gain(vcon, ptq_all, metric)} |")
    _section(os.path.join(out, "accuracy.md"), f"quant {task} {name}".rstrip(), "\n".join(lines) + "\n")
GAP_ARMS = (("ptq", "PTQ"), ("post-shot", "post-shot"), ("post-shot+kd", "post-shot + KD"), ("vcon", "VCON"),
            ("vcon+kd", "VCON + KD"))


def _share(ptq: float, arm: dict, reference: dict) -> str:
    """Per-seed share (%) of the PTQ → reference perplexity gap an arm closes: (PTQ − arm) / (PTQ − reference), mean ±
    std over the seeds both have (100 %: the arm reaches the reference; above 100 %: it ends below it)."""
    seeds = sorted(set(arm) & set(reference))
    shares = [100 * (ptq - arm[s]) / (ptq - reference[s]) for s in seeds]
    if not shares:
        return "—"
    return f"{shares[0]:.0f} % (1 seed)" if len(shares) == 1 else f"{np.mean(shares):.0f} ± {np.std(shares, ddof=1):.0f} %"


def write_gap_table(records: list[dict], dense: float, out: str, task: str, header: str, name: str = "") -> None:
    """Perplexity of every arm per quantization preset and the share of the PTQ → dense gap it closes, against the
    dense starting point and against dense+ (the dense model trained with the arms' recipe, the same budget)."""
    runs = defaultdict(dict)  # (setting, arm) -> {seed: perplexity}
    for record in records:
        setting = "—" if record["arm"].startswith("dense+") else _quant_label(record)
        runs[(setting, record["arm"])][record["seed"]] = record["test_metric"]
    plus, plus_kd = runs.get(("—", "dense+"), {}), runs.get(("—", "dense+kd"), {})
    settings = list(dict.fromkeys(_quant_label(r) for r in records if not r["arm"].startswith("dense+")))
    caption = (f"**{task}, share of the PTQ → dense gap closed** — {header}. Test perplexity (lower is better) after "
               "the last step, mean ± std over seeds (PTQ and dense are deterministic: one number). Share closed = "
               "(PTQ − arm) / (PTQ − reference), per seed: against dense (the starting point) and against dense+ (the "
               "dense model trained for the same steps with the same recipe, uncompressed; the same training budget, "
               "the fair one); the distilled arms also against dense+ + KD (dense+ distilling from the dense model, as "
               "they do). VCON vs post-shot: paired perplexity gain (post-shot − VCON, same distillation), with the "
               "seeds on which VCON is better.")
    columns = ("| setting | arm | perplexity | share of PTQ → dense closed | share of PTQ → dense+ closed | "
               "share of PTQ → dense+ + KD closed | VCON vs post-shot |")
    lines = [caption, "", columns, "|---|---|---|---|---|---|---|", f"| — | dense | {dense:.2f} | — | — | — | — |",
             f"| — | dense+ | {_values(plus, 'perplexity')} | — | — | — | — |"]
    if plus_kd:
        lines.append(f"| — | dense+ + KD | {_values(plus_kd, 'perplexity')} | — | — | — | — |")
    for setting in settings:
        ptq_runs = runs.get((setting, "ptq"), {})
        ptq = next(iter(ptq_runs.values()), None)
        for arm, label in GAP_ARMS:
            values = runs.get((setting, arm), {})
            if not values:
                continue
            start = {seed: dense for seed in values}
            gap = "—" if ptq is None or arm == "ptq" else _share(ptq, values, start)
            gap_plus = "—" if ptq is None or arm == "ptq" else _share(ptq, values, plus)
            gap_plus_kd = _share(ptq, values, plus_kd) if ptq is not None and arm.endswith("+kd") else "—"
            versus = _gain(values, runs.get((setting, arm.replace("vcon", "post-shot")), {}), "perplexity") \
                if arm.startswith("vcon") else "—"
            lines.append(f"| {setting} | {label} | {_values(values, 'perplexity', deterministic=arm == 'ptq')} | "
                         f"{gap} | {gap_plus} | {gap_plus_kd} | {versus} |")
    _section(os.path.join(out, "accuracy.md"), f"gap {task} {name}".rstrip(), "\n".join(lines) + "\n")


KD_ARMS = ("post-shot", "vcon", "post-shot+kd", "vcon+kd")


def write_kd_table(records: list[dict], dense: float, out: str, task: str, header: str, q: float,
                   schedule: str) -> None:
    """What distillation adds: the four arms, KD's paired gain for each transition, and VCON + KD against post-shot +
    KD (the ``table kd <task>`` section of accuracy.md)."""
    accuracy = defaultdict(dict)  # (method, arm) -> {seed: acc}
    for record in records:
        accuracy[(record["method"], record["arm"])][record["seed"]] = record["test_accuracy"]
    methods = list(dict.fromkeys(record["method"] for record in records if record["arm"].endswith("+kd")))
    lines = [f"**{task}, distillation** — {header}; Q = {q:g} of the run ({schedule} β). Test accuracy (%) of the "
             "compressed model after the last step, mean ± std over seeds; gains are per-seed paired differences "
             "(same seed, same data order), with the number of seeds on which the first arm is better.", "",
             "| method | dense (teacher) | post-shot | VCON | post-shot + KD | VCON + KD | KD gain, post-shot | "
             "KD gain, VCON | VCON + KD − post-shot + KD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        post, vcon, post_kd, vcon_kd = (accuracy.get((method, arm), {}) for arm in KD_ARMS)
        lines.append(f"| {method} | {100 * dense:.2f} | {_pm(list(post.values()))} | {_pm(list(vcon.values()))} | "
                     f"{_pm(list(post_kd.values()))} | {_pm(list(vcon_kd.values()))} | {_paired_gain(post_kd, post)} | "
                     f"{_paired_gain(vcon_kd, vcon)} | {_paired_gain(vcon_kd, post_kd)} |")
    alphas = sorted({(r["kd_alpha"], r["kd_temperature"]) for r in records if r["arm"].endswith("+kd")})
    marker = f"table kd {task} " + " ".join(f"alpha {a:g} T {t:g}" for a, t in alphas)
    _section(os.path.join(out, "accuracy.md"), marker, "\n".join(lines) + "\n")


def plot_curves(records: list[dict], out: str, task: str, dense: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(record["method"] for record in records))
    figure, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False, dpi=80)
    for axis, method in zip(axes[0], methods):
        twin = axis.twinx()
        for arm in ARMS:
            runs = [r for r in records if r["method"] == method and r["arm"] == arm and r["curve"]]
            if not runs:
                continue
            steps = [point["step"] for point in runs[0]["curve"]]
            values = np.array([[point["accuracy"] for point in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
            mean, std = 100 * values.mean(0), 100 * values.std(0)
            axis.plot(steps, mean, color=COLORS[arm], label=f"{arm} (compressed)")
            axis.fill_between(steps, mean - std, mean + std, color=COLORS[arm], alpha=0.15)
            if arm == "vcon":
                twin.plot(steps, [point["beta"] for point in runs[0]["curve"]], "--", color=COLORS[arm], label="β (VCON)")
            if arm == "gmp":
                final = runs[0]["curve"][-1]["sparsity"] or 1.0
                twin.plot(steps, [1 - (point["sparsity"] or 0) / final for point in runs[0]["curve"]], "--",
                          color=COLORS[arm], label="1 − s_t/s (GMP)")
        axis.axhline(100 * dense, color="black", lw=0.8, ls=":", label="dense")
        axis.set_title(f"{task}: {method}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("validation accuracy (%)")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("β")
        if axis is axes[0][0]:
            handles = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            axis.legend(handles=handles, fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(os.path.join(out, f"curves_{task}.png"))
    plt.close(figure)


def write_q_sweep(records: list[dict], dense: float, out: str, task: str, header: str, name: str) -> None:
    """Accuracy against Q (the paper's Figure 4) and the paired gain of each Q over post-shot (Q = 0).

    ``name`` tells sweeps apart (budget, schedule, learning rate): it keys the Markdown section and the PNG.
    """
    by_q = defaultdict(lambda: defaultdict(list))  # method -> q -> [acc]
    by_seed = defaultdict(dict)  # (method, q) -> {seed: acc}
    for record in records:
        by_q[record["method"]][record["q"]].append(record["test_accuracy"])
        by_seed[(record["method"], record["q"])][record["seed"]] = record["test_accuracy"]
    lines = [f"**{task}** — {header}. Test accuracy (%) of the compressed model against Q (fraction of the run; "
             "0 = post-shot), mean ± std over seeds; then the per-seed paired gain of each Q over post-shot.", ""]
    qs = sorted({record["q"] for record in records})
    lines += ["| method | " + " | ".join(f"Q = {q:g}" for q in qs) + " |", "|---|" + "---|" * len(qs)]
    for method, values in by_q.items():
        lines.append(f"| {method} | " + " | ".join(_pm(values.get(q, [])) for q in qs) + " |")
        if 0.0 in values:
            lines.append(f"| gain over post-shot | — | " + " | ".join(
                _paired_gain(by_seed[(method, q)], by_seed[(method, 0.0)]) for q in qs if q) + " |")
    _section(os.path.join(out, "q_sweep.md"), f"q_sweep {task} {name}", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.8, 3.4), dpi=80)
    for method, values in by_q.items():
        means = [100 * np.mean(values[q]) for q in qs]
        stds = [100 * np.std(values[q], ddof=1) if len(values[q]) > 1 else 0 for q in qs]
        axis.errorbar(qs, means, yerr=stds, marker="o", capsize=3, label=method)
    axis.axhline(100 * dense, color="black", lw=0.8, ls=":", label="dense")
    axis.set_xlabel("transition length Q (fraction of the run)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"{task}: accuracy vs Q ({name})", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(out, f"q_sweep_{task}_{name.replace(' ', '_')}.png"))
    plt.close(figure)


def plot_regimes(records: list[dict], out: str, task: str) -> str:
    """One picture of when VCON pays: its paired gain over post-shot against Q, one line per method and regime
    (budget in steps, β schedule, learning rate), mean ± standard error over seeds. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    post = {(r["method"], r["steps"], r["lr"], r["seed"]): r["test_accuracy"]
            for r in records if r["arm"] == "post-shot"}
    gains = defaultdict(lambda: defaultdict(list))  # (method, steps, schedule, lr) -> q -> [gain]
    for r in records:
        base = post.get((r["method"], r["steps"], r["lr"], r["seed"]))
        if r["arm"] == "vcon" and base is not None:
            gains[(r["method"], r["steps"], r["schedule"], r["lr"])][r["q"]].append(100 * (r["test_accuracy"] - base))
    methods = sorted({key[0] for key in gains})
    figure, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.6), squeeze=False, dpi=80)
    for axis, method in zip(axes[0], methods):
        regimes = sorted(gains.items(), key=lambda item: (item[0][1], str(item[0][2]), item[0][3]))
        for (m, steps, schedule, lr), by_q in regimes:
            qs = [q for q in sorted(by_q) if len(by_q[q]) > 1]
            if m != method or len(qs) < 2:
                continue
            means = [np.mean(by_q[q]) for q in qs]
            errors = [np.std(by_q[q], ddof=1) / np.sqrt(len(by_q[q])) for q in qs]
            axis.errorbar(qs, means, yerr=errors, marker="o", capsize=3,
                          label=f"{steps} steps, {schedule}, lr {lr:g} (n={min(len(by_q[q]) for q in qs)})")
        axis.axhline(0.0, color="black", lw=0.8, ls=":")
        axis.set_yscale("symlog", linthresh=2.0)  # linear within ±2 points, where most regimes sit
        low, high = axis.get_ylim()
        axis.set_yticks([t for t in (-20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 40) if low <= t <= high])
        axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:+g}"))
        axis.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_title(f"{task}: {method}", fontsize=9)
        axis.set_xlabel("transition length Q (fraction of the run)")
        axis.set_ylabel("VCON − post-shot (points, mean ± s.e.)")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
    figure.tight_layout()
    path = os.path.join(out, f"regimes_{task}.png")
    figure.savefig(path)
    plt.close(figure)
    return path
