"""benchmarks/accuracy.py's quantization presets, dense+ arm and share-of-gap table, without training (fast)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def accuracy(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    for name in ("accuracy", "report"):
        sys.modules.pop(name, None)
    import accuracy

    return accuracy


def test_preset_names_are_settings_and_dense_plus_runs_once_per_seed(accuracy):
    args = accuracy.parse_args(["--methods", "quant", "--quant_settings", "NVFP4A16,4:group,W4A16", "--kd",
                                "--dense_plus", "--group_size", "128"])
    assert accuracy.compression_settings("quant", args) == [
        {"scheme": "NVFP4A16"}, {"bits": 4, "strategy": "group", "group_size": 128, "clip_search": False},
        {"scheme": "W4A16"}]
    plan = accuracy.make_plan(["quant"], [], args)
    assert [arm for _, arm, _, _ in plan].count("dense+") == [arm for _, arm, _, _ in plan].count("dense+kd") == 1
    nvfp4 = [arm for _, arm, _, options in plan if options == {"scheme": "NVFP4A16"}]
    assert sorted(nvfp4) == ["post-shot", "post-shot+kd", "ptq", "vcon", "vcon+kd"]
    config = accuracy.vcon_config("quant", "vcon+kd", 0.2, args, accuracy.vcon_options({"scheme": "W4A16"}))
    assert config.method == "quant" and config.transition_steps == 0.2
    # presets are part of a run's key: two presets never reuse each other's runs
    keys = {accuracy.run_key({"task": "clm", "method": "quant", "arm": "vcon", "q": 0.2, "seed": 0, "schedule": "linear",
                              "steps": 150, "lr": 5e-4, "lr_scheduler": "cosine", **options})
            for options in ({"scheme": "NVFP4A16"}, {"scheme": "W4A16"})}
    assert len(keys) == 2


def test_gap_table_shares_against_dense_and_dense_plus(accuracy, tmp_path):
    import report

    def run(arm, seed, ppl, scheme="W4A16"):
        return {"task": "clm", "method": "quant", "arm": arm, "seed": seed, "test_metric": ppl,
                **({} if arm.startswith("dense+") else {"scheme": scheme})}

    # PTQ 80, dense 70; dense+ 60 / 64 on seeds 0 / 1; post-shot 75 / 72; VCON 70 / 73
    records = [run("ptq", 0, 80.0), run("dense+", 0, 60.0), run("dense+", 1, 64.0), run("post-shot", 0, 75.0),
               run("post-shot", 1, 72.0), run("vcon", 0, 70.0), run("vcon", 1, 73.0), run("dense+kd", 0, 65.0),
               run("vcon+kd", 0, 70.0)]
    report.write_gap_table(records, 70.0, str(tmp_path), "clm", "header", "test")
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): [cell.strip() for cell in line.split("|")[3:-1]]
            for line in (tmp_path / "accuracy.md").read_text().splitlines() if line.startswith("| ")}
    # post-shot: (80−75)/10 = 50 %, (80−72)/10 = 80 % → 65 ± 21; against dense+: 5/20 = 25 %, 8/16 = 50 % → 38 ± 18
    assert rows[("W4A16", "post-shot")] == ["73.50 ± 2.12", "65 ± 21 %", "38 ± 18 %", "—", "—"]
    # VCON: 100 % and 70 % → 85 ± 21; 10/20 = 50 %, 7/16 = 43.75 % → 47 ± 4; gains 75−70 = 5, 72−73 = −1
    assert rows[("W4A16", "VCON")] == ["71.50 ± 2.12", "85 ± 21 %", "47 ± 4 %", "—", "+2.00 ± 4.24, better on 1/2"]
    assert rows[("W4A16", "PTQ")] == ["80.00", "—", "—", "—", "—"]
    # a distilled arm against dense+ + KD as well: (80 − 70) / (80 − 65) = 67 %; no post-shot + KD to pair with
    assert rows[("W4A16", "VCON + KD")] == ["70.00 (1 seed)", "100 % (1 seed)", "50 % (1 seed)", "67 % (1 seed)", "—"]
    assert rows[("—", "dense+")][0] == "62.00 ± 2.83"
