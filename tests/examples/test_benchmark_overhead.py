"""benchmarks/overhead.py: the --grid summary holds one ratio per setting and variant, read from the tables it prints."""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_grid_prints_each_settings_table_and_one_summary(monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("overhead", None)
    import overhead

    monkeypatch.setattr(overhead, "SHAPES", {**overhead.SHAPES, "tiny": (32, 64, 2, 2)})
    monkeypatch.setattr(overhead, "GRID", (
        {"shape": "tiny", "layers": 1, "batch": 2, "seq": 8},
        {"shape": "tiny", "layers": 2, "batch": 1, "seq": 4, "optimizer": "sgd", "threads": 1},
    ))
    overhead.main(["--grid", "--no-memory", "--no-inference", "--repeats", "3", "--warmup", "1", "--vocab-size", "50",
                   "--variants", "prune after", "binary transition", "--recompute-every", "5"])
    output = capsys.readouterr().out
    assert output.count("# hf_vcon overhead: tiny shapes") == 2 and ", sgd, " in output
    summary = output[output.index("# grid summary"):]
    header = next(line for line in summary.splitlines() if line.startswith("| variant"))
    assert header.count("tiny") == 2 and "tiny ×2, 1×4, sgd, 1 thread(s)" in header
    rows = {line.split(" | ")[0][2:]: line for line in summary.splitlines() if line.startswith("| ") and "variant" not in line}
    assert list(rows) == ["prune after", "binary transition", "binary transition, recompute_every=5"]
    for name, line in rows.items():
        ratios = [float(cell) for cell in re.findall(r"\| (\d+\.\d{3}) ", line)]
        assert len(ratios) == 2 and all(0.05 < ratio < 20 for ratio in ratios), line
    assert rows["prune after"].endswith("| <= 1.05 |") and rows["binary transition, recompute_every=5"].endswith("| (option) |")
