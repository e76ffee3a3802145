"""Worker that ``tests/training/test_distributed.py`` and ``benchmarks/distributed_gpu_check.sh`` launch on every rank.

It trains a tiny BERT (built from a config, no Hub) with :class:`hf_vcon.VConTrainer` for each method, under
whatever distribution the launcher set up (``accelerate launch --config_file …`` / ``torchrun``: DDP, FSDP,
DeepSpeed ZeRO-3) or in one process, with a transition that ends inside the run. Each rank writes
``<output>/records/<method>-rank<r>.json``:

- ``world_size`` and ``distributed_type`` as the Trainer saw them;
- per training forward of every VCON layer: the optimizer step, β, the shape of the latent weight W the layer
  saw inside its forward (the full shape, never a shard) and a digest of the compressed weight C it computed
  from it (so masks, scales and low-rank factors can be compared across ranks bit for bit);
- ``writes``: every file this rank opened for writing (or moved into place) under the run's folder, in order (a
  Python audit hook plus the safetensors writer, which writes from Rust).

The merged model lands in ``<output>/<method>`` (``trainer.save_model()``), a mid-run checkpoint in
``<output>/<method>/checkpoint-<n>``.

Run ``python tests/distributed_worker.py --help`` for the options; :func:`train_one` is also imported by the
tests to make the single-process reference in-process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from hf_vcon import VConConfig, VConTrainer, apply_vcon, get_beta, get_vcon_state, save_merged, set_step  # noqa: E402
from hf_vcon.patching.distributed import check_sharding  # noqa: E402

import conftest  # noqa: E402  (this script's folder is on sys.path; it registers the tests' plugin compressions)
from conftest import TinyTextDataset, close_process_group  # noqa: E402

# Every registered method with its first example setting, as the tests' matrix has it.
METHOD_SETTINGS = {method: settings[0] for method, settings in conftest.METHOD_SETTINGS.items()}
MAX_STEPS = 6
TRANSITION_STEPS = 3  # β = 1, 2/3, 1/3, then 0 from step 3 on: the transition ends inside the run
SAVE_STEPS = 2  # one checkpoint mid-transition (β = 1/3 next), written by the Trainer with the VCON layers
GLOBAL_BATCH = 4
SEED = 0


def tiny_bert(seed: int = SEED) -> BertForSequenceClassification:
    """Built with ``_from_config``, as ``from_pretrained`` builds: under ZeRO-3 (zero3_init) it is partitioned at once."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification._from_config(config)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class WriteAudit:
    """Every file this process opens for writing under ``root``, in order, while ``active``."""

    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.paths: list[str] = []
        self.active = False
        sys.addaudithook(self._hook)
        import safetensors.torch
        import transformers.modeling_utils

        def traced(save_file):
            def save(obj, filename, *args, **kwargs):
                self._note(filename)
                return save_file(obj, filename, *args, **kwargs)

            return save

        # Writers that do not go through Python's open(): safetensors (Rust) and torch.save (C++ zip writer).
        safetensors.torch.save_file = traced(safetensors.torch.save_file)
        transformers.modeling_utils.safe_save_file = traced(transformers.modeling_utils.safe_save_file)
        torch.save = traced(torch.save)

    def _note(self, path) -> None:
        if not self.active or not isinstance(path, (str, bytes, os.PathLike)):
            return
        real = os.path.realpath(os.fsdecode(path))
        if real.startswith(self.root + os.sep):
            self.paths.append(os.path.relpath(real, self.root))

    def _hook(self, event, args):
        if event in ("os.rename", "os.replace") and self.active:  # a file moved into place is written there
            self._note(args[1])
            return
        if event != "open" or not self.active:
            return
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & self._WRITE_FLAGS)
        if writes:
            self._note(path)


def record_layers(trainer: VConTrainer, layers) -> list:
    """Per training forward of each VCON layer: [step, β, W's shape as seen inside forward, digest of C]."""
    records = []

    def hook(module, inputs, output):  # a forward hook: inside FSDP / ZeRO-3 units W is gathered here
        if module.training:
            index = layer_index[id(module)]
            records.append([trainer.state.global_step, module.beta, index, list(module.latent_weight().shape),
                            digest(module.compressed_weight())])

    layer_index = {id(layer): index for index, layer in enumerate(layers)}
    for layer in layers:
        layer.register_forward_hook(hook)
    return records


def _is_shard_unit(module) -> bool:
    """An FSDP1 wrapper or an FSDP2 ``fully_shard``-ed module."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


def training_args(output_dir: str, per_device_batch: int, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=output_dir, max_steps=MAX_STEPS, per_device_train_batch_size=per_device_batch, learning_rate=1e-3,
        logging_steps=1, save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=None, report_to=[], seed=SEED,
        disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False, use_cpu=not torch.cuda.is_available(),
        # transformers multiplies the loss by the world size for models that take loss kwargs, expecting them to
        # divide by the global item count; BertForSequenceClassification takes a plain mean, so that would double
        # the gradient of a 2-rank run against the 1-process reference (a transformers matter, not a VCON one).
        average_tokens_across_devices=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def train_one(method: str, output: str, per_device_batch: Optional[int] = None, audit: Optional[WriteAudit] = None,
              rank_dependent_init: bool = False, **arg_overrides) -> dict:
    """Train ``method`` for ``MAX_STEPS`` on the global batch ``GLOBAL_BATCH`` and save the merged model; return the records.

    ``rank_dependent_init`` builds each rank's model from another seed (rank 0's is the reference's): the engine
    must make every rank start from rank 0's weights and low-rank factors.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    per_device_batch = per_device_batch or GLOBAL_BATCH // world_size
    output_dir = os.path.join(output, method)
    config = VConConfig(method=method, transition_steps=TRANSITION_STEPS, **METHOD_SETTINGS[method])
    args = training_args(output_dir, per_device_batch, **arg_overrides)  # first: it sets up ZeRO-3 before the model
    model = tiny_bert(SEED + rank if rank_dependent_init else SEED)
    trainer = VConTrainer(model=model, args=args, vcon_config=config, train_dataset=TinyTextDataset())
    layers = get_vcon_state(model).layers
    records = record_layers(trainer, layers)
    if audit is not None:
        audit.active = True
    trainer.train()
    trainer.save_model()
    if audit is not None:
        audit.active = False
    return {
        "method": method,
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "process_index": trainer.args.process_index,
        "fsdp": trainer.is_fsdp_enabled,
        "deepspeed": trainer.is_deepspeed_enabled,
        "sharded_modules": sorted({type(m).__name__ for m in trainer.model_wrapped.modules() if _is_shard_unit(m)}),
        "final_beta": get_beta(trainer.model),
        "layers": get_vcon_state(model).targeted_module_names,
        "forwards": records,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "writes": list(audit.paths) if audit is not None else [],
    }


def shard_with_fsdp(model, version: int):
    """Shard ``model`` as accelerate does, each BertLayer a unit plus the root: FSDP2 ``fully_shard`` or FSDP1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if version == 2:
        mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
        for block in model.bert.encoder.layer:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({BertLayer}), use_orig_params=True,
                                    device_id=torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu"))


def train_raw_fsdp(method: str, output: str, version: int) -> dict:
    """The library under FSDP without the Trainer (accelerate turns FSDP on only on accelerators, never on CPU).

    ``version`` 1 or 2 shards the model; 0 is the one-process reference on the same global batches. The loop sets β
    with :func:`hf_vcon.set_step`, and the merged model is saved on rank 0 from the full state dict.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank = torch.distributed.get_rank() if version else 0
    world_size = torch.distributed.get_world_size() if version else 1
    device = torch.device("cuda", torch.cuda.current_device()) if version and torch.cuda.is_available() else torch.device("cpu")
    model = tiny_bert().to(device)
    apply_vcon(model, VConConfig(method=method, transition_steps=TRANSITION_STEPS, **METHOD_SETTINGS[method]))
    layers = get_vcon_state(model).layers
    step_box = type("Step", (), {"state": type("State", (), {"global_step": 0})()})()
    records = record_layers(step_box, layers)
    if version:
        model = shard_with_fsdp(model, version)
        check_sharding(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data, per_rank = TinyTextDataset(), GLOBAL_BATCH // world_size
    losses = []
    for step in range(MAX_STEPS):
        step_box.state.global_step = step
        set_step(model, step)
        start = step * GLOBAL_BATCH + rank * per_rank
        batch = {key: value[start:start + per_rank].to(device) for key, value in
                 {"input_ids": data.input_ids, "labels": data.labels}.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # cpu_offload=True on a CPU-only FSDP1 run crashes torch 2.13 (SIGSEGV in its state-dict hook); offload on GPU only.
    options = StateDictOptions(full_state_dict=True, cpu_offload=device.type != "cpu")
    state_dict = get_model_state_dict(model, options=options) if version else None
    if rank == 0:
        save_merged(model, os.path.join(output, f"{method}-fsdp{version}"), state_dict=state_dict)
    return {"method": method, "fsdp_version": version, "world_size": world_size, "process_index": rank,
            "forwards": records, "losses": losses}


def check_rejects_sharded_base_layer() -> bool:
    """``check_sharding`` must refuse a model whose VCON layer's base_layer is its own FSDP2 unit."""
    from torch.distributed.fsdp import fully_shard

    from hf_vcon import VConError

    model = apply_vcon(tiny_bert(), VConConfig(method="prune", sparsity=0.5, target_modules=["query"]))
    fully_shard(model.bert.encoder.layer[0].attention.self.query.base_layer)
    try:
        check_sharding(model)
    except VConError:
        return True
    return False


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the runs and the per-rank records")
    parser.add_argument("--methods", default=",".join(METHOD_SETTINGS), help="comma-separated methods to train")
    parser.add_argument("--expect_world_size", type=int, default=None, help="fail unless the launcher started this many")
    parser.add_argument("--fsdp_config", default=None, help="JSON dict for TrainingArguments(fsdp_config=…); enables FSDP")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config file for TrainingArguments(deepspeed=…)")
    parser.add_argument("--rank_dependent_init", action="store_true", help="seed each rank's model differently")
    parser.add_argument("--raw_fsdp", default=None, help="comma-separated FSDP versions (1, 2) to run without the Trainer")
    options = parser.parse_args(argv)

    overrides = {}
    if options.fsdp_config:
        overrides.update(fsdp="full_shard", fsdp_config=json.loads(options.fsdp_config))
    if options.deepspeed:
        overrides.update(deepspeed=options.deepspeed)
    os.makedirs(options.output, exist_ok=True)
    records_dir = os.path.join(options.output, "records")
    os.makedirs(records_dir, exist_ok=True)
    if options.raw_fsdp:
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group(backend)
        rank = torch.distributed.get_rank()
        for method in options.methods.split(","):
            for version in (int(v) for v in options.raw_fsdp.split(",")):
                result = train_raw_fsdp(method, options.output, version)
                with open(os.path.join(records_dir, f"{method}-fsdp{version}-rank{rank}.json"), "w") as handle:
                    json.dump(result, handle)
        with open(os.path.join(records_dir, f"check-rank{rank}.json"), "w") as handle:
            json.dump({"rejects_sharded_base_layer": check_rejects_sharded_base_layer()}, handle)
        close_process_group()
        return
    audit = WriteAudit(options.output)
    for method in options.methods.split(","):
        audit.paths.clear()
        result = train_one(method, options.output, audit=audit, rank_dependent_init=options.rank_dependent_init,
                           **overrides)
        if options.expect_world_size is not None and result["world_size"] != options.expect_world_size:
            raise SystemExit(f"expected world size {options.expect_world_size}, the Trainer saw {result['world_size']}")
        with open(os.path.join(records_dir, f"{method}-rank{result['process_index']}.json"), "w") as handle:
            json.dump(result, handle)
    close_process_group()


if __name__ == "__main__":
    main()
