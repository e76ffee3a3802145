"""Worker that ``tests/test_distributed.py`` and ``benchmarks/distributed_gpu_check.sh`` launch on every rank.

It trains a tiny BERT (built from a config, no Hub) with :class:`hf_vcon.VConTrainer` for each method, under
whatever distribution the launcher set up (``accelerate launch --config_file …`` / ``torchrun``: DDP, FSDP,
DeepSpeed ZeRO-3) or in one process, with a transition that ends inside the run. Each rank writes
``<output>/records/<method>-rank<r>.json``:

- ``world_size`` and ``distributed_type`` as the Trainer saw them;
- per training forward of every VCON layer: the optimizer step, β, the shape of the latent weight W the layer
  saw inside its forward (the full shape, never a shard) and a digest of the compressed weight C it computed
  from it (so masks, scales and low-rank factors can be compared across ranks bit for bit);
- ``writes``: every file this rank opened for writing under the run's folder, in order (a Python audit hook plus
  the safetensors writer, which writes from Rust).

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

from hf_vcon import VConConfig, VConTrainer, get_beta, get_vcon_state  # noqa: E402

METHOD_SETTINGS = {"prune": dict(sparsity=0.5), "binary": dict(), "lowrank": dict(rank=4)}
MAX_STEPS = 6
TRANSITION_STEPS = 3  # β = 1, 2/3, 1/3, then 0 from step 3 on: the transition ends inside the run
SAVE_STEPS = 2  # one checkpoint mid-transition (β = 1/3 next), written by the Trainer with the VCON layers
GLOBAL_BATCH = 4
SEQ_LEN = 8
SEED = 0


class TinyTextDataset(torch.utils.data.Dataset):
    """Deterministic token sequences; the label is a function of the first token."""

    def __init__(self, size: int = 32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, 99, (size, SEQ_LEN), generator=generator)
        self.labels = self.input_ids[:, 0] % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


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
              **arg_overrides) -> dict:
    """Train ``method`` for ``MAX_STEPS`` on the global batch ``GLOBAL_BATCH`` and save the merged model; return the records."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device_batch = per_device_batch or GLOBAL_BATCH // world_size
    output_dir = os.path.join(output, method)
    config = VConConfig(method=method, transition_steps=TRANSITION_STEPS, **METHOD_SETTINGS[method])
    model = tiny_bert()
    args = training_args(output_dir, per_device_batch, **arg_overrides)
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


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the runs and the per-rank records")
    parser.add_argument("--methods", default=",".join(METHOD_SETTINGS), help="comma-separated methods to train")
    parser.add_argument("--expect_world_size", type=int, default=None, help="fail unless the launcher started this many")
    parser.add_argument("--fsdp_config", default=None, help="JSON dict for TrainingArguments(fsdp_config=…); enables FSDP")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config file for TrainingArguments(deepspeed=…)")
    options = parser.parse_args(argv)

    overrides = {}
    if options.fsdp_config:
        overrides.update(fsdp="full_shard", fsdp_config=json.loads(options.fsdp_config))
    if options.deepspeed:
        overrides.update(deepspeed=options.deepspeed)
    os.makedirs(options.output, exist_ok=True)
    audit = WriteAudit(options.output)
    for method in options.methods.split(","):
        audit.paths.clear()
        result = train_one(method, options.output, audit=audit, **overrides)
        if options.expect_world_size is not None and result["world_size"] != options.expect_world_size:
            raise SystemExit(f"expected world size {options.expect_world_size}, the Trainer saw {result['world_size']}")
        records_dir = os.path.join(options.output, "records")
        os.makedirs(records_dir, exist_ok=True)
        with open(os.path.join(records_dir, f"{method}-rank{result['process_index']}.json"), "w") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    main()
