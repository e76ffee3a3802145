"""Distillation under DDP: two gloo ranks (``torchrun``) train with a teacher that DDP never wraps and that never
changes, and end with the weights of a one-process run on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import distill_worker as worker

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("distill_ddp"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               os.path.join(TESTS, "distill_worker.py"), "--output", output]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=output)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")

    def load(run: str) -> list[dict]:
        return [json.load(open(os.path.join(output, f"{run}-rank{rank}.json"), encoding="utf-8")) for rank in (0, 1)]

    return {run: load(run) for run in worker.RUNS}, str(tmp_path_factory.mktemp("distill_reference"))


@pytest.mark.parametrize("run", list(worker.RUNS))
def test_ddp_distillation_matches_one_process(ranks, run):
    results, reference_dir = ranks
    for result in results[run]:
        assert result["world_size"] == 2 and result["student_wrapper"] == "DistributedDataParallel"
        assert not result["teacher_wrapped"] and not result["teacher_in_ddp"]
        assert result["teacher_unchanged"] and not result["teacher_grads"]
    assert results[run][0]["kd_losses"] == results[run][1]["kd_losses"]  # averaged over ranks
    assert results[run][0]["kd_losses"][-1] > 0
    reference = worker.train(run, reference_dir)
    assert reference["world_size"] == 1
    for key, expected in reference["weights"].items():
        for result in results[run]:
            torch.testing.assert_close(torch.tensor(result["weights"][key]), torch.tensor(expected), atol=1e-6, rtol=0,
                                       msg=key)
