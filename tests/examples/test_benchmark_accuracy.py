"""Smoke test of benchmarks/accuracy.py at a tiny budget (slow: trains ten tiny ViTs; run with -m slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from hf_vcon import VConConfig, beta_at

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs the [benchmarks] extra")
def test_accuracy_benchmark_runs_every_arm_and_writes_table_and_pictures(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("accuracy", None)
    import accuracy

    common = ["--task", "vision", "--seeds", "0,1", "--steps", "8", "--dense_steps", "10", "--eval_every", "4",
              "--out", str(tmp_path)]
    accuracy.main(common + ["--methods", "prune,binary"])
    records = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert sorted({(r["method"], r["arm"]) for r in records}) == [
        ("binary", "post-shot"), ("binary", "vcon"), ("prune", "gmp"), ("prune", "post-shot"), ("prune", "vcon")]
    assert all(r["final_beta"] == 0.0 and len(r["curve"]) == 2 for r in records)
    vcon = next(r for r in records if r["arm"] == "vcon")
    q = VConConfig(transition_steps=0.2).resolve_transition_steps(8)  # the default --transition of an 8-step run
    assert [point["step"] for point in vcon["curve"]] == [4, 8]
    assert [point["beta"] for point in vcon["curve"]] == [beta_at(4, q), beta_at(8, q)] == [0.0, 0.0]
    gmp = next(r for r in records if r["arm"] == "gmp")
    assert gmp["curve"][-1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    table = (tmp_path / "accuracy.md").read_text()
    assert "| prune |" in table and "| binary |" in table and "gain VCON − post-shot" in table
    assert (tmp_path / "curves_vision.png").stat().st_size > 1000

    # rerunning skips the runs already recorded; a Q sweep adds only the new Q values
    accuracy.main(common + ["--methods", "binary", "--q_sweep", "0,0.2,0.5"])
    records = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert len(records) == 10 + 2
    sweep = (tmp_path / "q_sweep.md").read_text()
    assert "q_sweep vision 8 steps linear lr 0.001" in sweep and "| gain over post-shot | — |" in sweep
    assert (tmp_path / "q_sweep_vision_8_steps_linear_lr_0.001.png").exists()
