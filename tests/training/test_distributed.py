"""VCON under distribution: two gloo ranks on CPU (DDP through ``accelerate launch`` and VConTrainer; FSDP1 and FSDP2
through ``torchrun``), and FSDP / ZeRO-3 through VConTrainer on a GPU (``-m gpu``,
``benchmarks/distributed_gpu_check.sh``).

Each launched job trains every method in one go (see ``tests/distributed_worker.py``), with a transition that ends
inside the run, and is compared with a one-process run on the same global batches.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as worker
from hf_vcon import VConConfig, VConError, apply_vcon, available_compressors
from hf_vcon.patching.distributed import check_fsdp_plugin, check_sharding, gathered_for_reading

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "distributed_worker.py")
CONFIGS = os.path.join(REPO, "examples", "accelerate_configs")
METHODS = list(available_compressors())
TOLERANCE = 1e-6
LAUNCH_TIMEOUT = 600

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def launch(command: list[str], cwd: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")


def accelerate_launch(config_file: str, output: str, *options: str, num_processes: int = 2) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
               "--num_processes", str(num_processes), "--mixed_precision", "no", WORKER, "--output", output,
               "--expect_world_size", str(num_processes), *options]
    launch(command, cwd=output)


def torchrun(output: str, *options: str, num_processes: int = 2) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), WORKER,
               "--output", output, *options]
    launch(command, cwd=output)


def records(output: str, name: str, world_size: int = 2) -> list[dict]:
    result = []
    for rank in range(world_size):
        with open(os.path.join(output, "records", f"{name}-rank{rank}.json"), encoding="utf-8") as handle:
            result.append(json.load(handle))
    return result


def expected_beta(step: int) -> float:
    return max(1.0 - step / worker.TRANSITION_STEPS, 0.0)


def assert_forwards_agree(ranks: list[dict], reference: dict) -> None:
    """Every rank ran the same forwards: same step, β, full W shape and bit-identical C (mask / scale / factors)."""
    first = ranks[0]["forwards"]
    layer_count = len(reference["forwards"]) // worker.MAX_STEPS
    assert len(first) == worker.MAX_STEPS * layer_count
    for other in ranks[1:]:
        assert other["forwards"] == first
    steps_and_betas = sorted({(step, beta) for step, beta, *_ in first})
    assert steps_and_betas == [(step, pytest.approx(expected_beta(step))) for step in range(worker.MAX_STEPS)]
    assert steps_and_betas[-1][1] == 0.0  # the transition ended inside the run
    # Inside its forward every layer saw the full weight, never a shard: the shapes of the one-process run.
    assert [shape for *_, shape, _ in first] == [shape for *_, shape, _ in reference["forwards"]]
    # Step 0 runs on the initial weights: identical C, bit for bit, to the one-process run (after that, summing the
    # gradient over ranks rounds differently, so later steps are compared through the final weights).
    assert first[:layer_count] == reference["forwards"][:layer_count]


def assert_same_merged(folder: str, reference_folder: str) -> None:
    merged, reference = load_file(os.path.join(folder, "model.safetensors")), load_file(
        os.path.join(reference_folder, "model.safetensors"))
    assert merged.keys() == reference.keys()
    assert not [key for key in merged if ".base_layer." in key or ".vcon_" in key]
    for key, tensor in reference.items():
        torch.testing.assert_close(merged[key], tensor, atol=TOLERANCE, rtol=0, msg=key)
        assert torch.equal(merged[key] == 0, tensor == 0), key  # the same pruning masks


# ------------------------------------------------------------------------------------------ CPU: DDP
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One `accelerate launch` of examples/accelerate_configs/ddp.yaml, two gloo ranks, every method."""
    output = str(tmp_path_factory.mktemp("ddp"))
    accelerate_launch(os.path.join(CONFIGS, "ddp.yaml"), output, "--rank_dependent_init")
    reference = str(tmp_path_factory.mktemp("ddp_reference"))
    references = {method: worker.train_one(method, reference) for method in METHODS}
    return output, reference, references


@pytest.mark.parametrize("method", METHODS)
def test_ddp_two_ranks_match_one_process(ddp_run, method):
    output, reference, references = ddp_run
    ranks = records(output, method)
    for rank, result in enumerate(ranks):
        assert (result["world_size"], result["process_index"]) == (2, rank)
        assert result["distributed_type"].endswith("MULTI_CPU") and not result["fsdp"] and not result["deepspeed"]
        assert result["final_beta"] == 0.0
    # β, masks, scales and low-rank factors agree on both ranks at every step, although rank 1 built its model (and
    # its SVD factors) from another seed: DDP started both from rank 0's parameters.
    assert_forwards_agree(ranks, references[method])
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert_same_merged(os.path.join(output, method), os.path.join(reference, method))

    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(os.path.join(output, method))
    assert not any("vcon" in name or "base_layer" in name for name, _ in loaded.named_parameters())


@pytest.mark.parametrize("method", METHODS)
def test_ddp_writes_every_file_once_from_the_main_process(ddp_run, method):
    output = ddp_run[0]
    main_writes, other_writes = (result["writes"] for result in records(output, method))
    # Rank 1 writes only its own random-number state into the Trainer's checkpoints.
    assert other_writes and all(os.path.basename(path) == "rng_state_1.pth" for path in other_writes)
    assert len(main_writes) == len(set(main_writes)), "a file was written twice"
    final = {name for name in os.listdir(os.path.join(output, method)) if not name.startswith("checkpoint-")}
    assert final == {"config.json", "model.safetensors", "vcon_config.json", "training_args.bin", "README.md"}
    # a compressed-tensors folder is written beside the output folder, loaded back, then moved into it
    moved_in = {re.sub(r"^\.hf_vcon-[^/]+/", f"{method}/", path) for path in main_writes}
    assert {f"{method}/{name}" for name in final} <= moved_in
    checkpoints = sorted(name for name in os.listdir(os.path.join(output, method)) if name.startswith("checkpoint-"))
    assert checkpoints == [f"checkpoint-{step}" for step in range(worker.SAVE_STEPS, worker.MAX_STEPS + 1, worker.SAVE_STEPS)]
    for checkpoint in checkpoints:
        assert main_writes.count(f"{method}/{checkpoint}/vcon_config.json") == 1


# ---------------------------------------------------------------------------- CPU: FSDP1 and FSDP2
@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One `torchrun` job: FSDP1 (use_orig_params) and FSDP2 (fully_shard) on two gloo ranks, every method."""
    output = str(tmp_path_factory.mktemp("fsdp"))
    torchrun(output, "--raw_fsdp", "1,2")
    references = {method: worker.train_raw_fsdp(method, output, version=0) for method in METHODS}
    return output, references


@pytest.mark.parametrize("version", [1, 2], ids=["fsdp1", "fsdp2"])
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_two_gloo_ranks_match_one_process(fsdp_run, method, version):
    """FSDP runs on CPU with gloo in this torch, though accelerate enables it only on accelerators: the library is
    driven here without the Trainer (FSDP2: each BertLayer and the root fully_shard-ed, as accelerate does)."""
    output, references = fsdp_run
    ranks = records(output, f"{method}-fsdp{version}")
    assert [result["world_size"] for result in ranks] == [2, 2]
    assert_forwards_agree(ranks, references[method])
    assert_same_merged(os.path.join(output, f"{method}-fsdp{version}"), os.path.join(output, f"{method}-fsdp0"))


def test_fsdp_rejects_a_base_layer_sharded_alone(fsdp_run):
    assert all(result["rejects_sharded_base_layer"] for result in records(fsdp_run[0], "check"))


# ------------------------------------------------------------------------------ checks, no launch
def test_fsdp1_without_use_orig_params_is_refused():
    with pytest.raises(VConError, match="use_orig_params"):
        check_fsdp_plugin(SimpleNamespace(fsdp_version=1, use_orig_params=False))
    check_fsdp_plugin(SimpleNamespace(fsdp_version=1, use_orig_params=True))
    check_fsdp_plugin(SimpleNamespace(fsdp_version=2, use_orig_params=False))
    check_fsdp_plugin(None)


def test_unsharded_model_passes_the_checks_and_gathers_nothing():
    model = apply_vcon(worker.tiny_bert(), VConConfig(method="lowrank", rank=4))
    check_sharding(model)
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    with gathered_for_reading([weight]):
        assert weight.shape == (32, 32)


# ------------------------------------------------------------------ GPU: through VConTrainer (-m gpu)
def _gpu_trainer_run(tmp_path, config_file: str, *launch_options: str) -> tuple[list[dict], str]:
    output = str(tmp_path / "run")
    os.makedirs(output)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes", "1",
               "--mixed_precision", "no", *launch_options, WORKER, "--output", output, "--expect_world_size", "1"]
    launch(command, cwd=output)
    reference = str(tmp_path / "reference")
    os.makedirs(reference)
    launch([sys.executable, WORKER, "--output", reference], cwd=reference)  # one process, no engine
    return output, reference


def _assert_gpu_run(output: str, reference: str, engine: str) -> None:
    for method in METHODS:
        (result,) = records(output, method, world_size=1)
        (single,) = records(reference, method, world_size=1)
        assert result[engine], f"{engine} was not enabled: {result['distributed_type']}"
        if engine == "fsdp":
            assert result["sharded_modules"], "no module was sharded"
        assert result["final_beta"] == 0.0
        assert [shape for *_, shape, _ in result["forwards"]] == [shape for *_, shape, _ in single["forwards"]]
        merged = load_file(os.path.join(output, method, "model.safetensors"))
        expected = load_file(os.path.join(reference, method, "model.safetensors"))
        assert merged.keys() == expected.keys()
        for key in expected:  # one GPU process each: the engine must not change the numbers beyond rounding
            torch.testing.assert_close(merged[key].float(), expected[key].float(), atol=1e-4, rtol=0, msg=key)
        assert len(result["writes"]) == len(set(result["writes"]))


@pytest.mark.gpu
@needs_gpu
def test_trainer_fsdp2_on_gpu(tmp_path):
    output, reference = _gpu_trainer_run(tmp_path, os.path.join(CONFIGS, "fsdp.yaml"))
    _assert_gpu_run(output, reference, "fsdp")


@pytest.mark.gpu
@needs_gpu
def test_trainer_fsdp1_use_orig_params_on_gpu(tmp_path):
    output, reference = _gpu_trainer_run(tmp_path, os.path.join(CONFIGS, "fsdp.yaml"), "--fsdp_version", "1",
                                         "--fsdp_use_orig_params", "true", "--fsdp_sync_module_states", "true")
    _assert_gpu_run(output, reference, "fsdp")


@pytest.mark.gpu
@needs_gpu
def test_trainer_deepspeed_zero3_on_gpu(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    output, reference = _gpu_trainer_run(tmp_path, os.path.join(CONFIGS, "deepspeed_zero3.yaml"))
    _assert_gpu_run(output, reference, "deepspeed")


@pytest.mark.gpu
@needs_gpu
def test_raw_fsdp_on_gpu(tmp_path):
    """FSDP1 and FSDP2 without the Trainer, one NCCL rank (two ranks cannot share one GPU under NCCL)."""
    output = str(tmp_path)
    torchrun(output, "--raw_fsdp", "1,2", num_processes=1)
    for method in METHODS:
        for version in (1, 2):
            (result,) = records(output, f"{method}-fsdp{version}", world_size=1)
            assert sorted({step for step, *_ in result["forwards"]}) == list(range(worker.MAX_STEPS))
            assert os.path.isfile(os.path.join(output, f"{method}-fsdp{version}", "model.safetensors"))



ZERO3_UNITS_SCRIPT = """
import copy, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from architectures import by_key
from hf_vcon import VConConfig, apply_vcon, set_beta
from hf_vcon.patching.distributed import prepare_zero3

deepspeed.init_distributed()
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True}
for key in ("mixtral", "siglip_vision_model"):  # fused experts; nn.MultiheadAttention: VConWeight units
    case = by_key(key)
    model = apply_vcon(case.build(), VConConfig(method="binary"))
    set_beta(model, 0.5)
    reference = copy.deepcopy(model)
    prepare_zero3(model)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    inputs = {name: value.to(engine.device) for name, value in case.labels_inputs().items()}
    loss = engine(**inputs).loss
    expected = reference.to(engine.device)(**inputs).loss
    assert torch.allclose(loss.float(), expected.float(), atol=1e-4), (key, float(loss), float(expected))
    engine.backward(loss)
    engine.step()
    print("ZERO3 UNITS OK", key, float(loss))
"""


@pytest.mark.gpu
@needs_gpu
def test_deepspeed_zero3_gathers_every_unit_kind_on_gpu():
    """ZeRO-3 partitions every parameter; the units read directly by their owner's forward (fused experts,
    MultiheadAttention) must be gathered with it (prepare_zero3): a step at β = 0.5 gives the unsharded loss."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    import random

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", ZERO3_UNITS_SCRIPT, str(random.randint(20000, 40000))], env=env,
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0 and result.stdout.count("ZERO3 UNITS OK") == 2, \
        result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("method, setting", [("prune", dict(sparsity=0.5)), ("lowrank", dict(rank=4)), ("binary", {})])
def test_rank_without_weights_can_attach(method, setting):
    """Under FSDP cpu_ram_efficient_loading, ranks other than 0 hold the model on the meta device until sharding."""
    from hf_vcon import VConCallback

    with torch.device("meta"):
        model = worker.tiny_bert()
    callback = VConCallback(VConConfig(method=method, **setting))
    callback.attach(model)
    with torch.device("cpu"):
        expected = VConCallback(VConConfig(method=method, **setting))
        expected.attach(worker.tiny_bert())
    assert callback.summary.metrics() == expected.summary.metrics()
    assert callback.summary.size_ratio == expected.summary.size_ratio
