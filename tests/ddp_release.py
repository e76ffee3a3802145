"""Run by test_perf.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): VCON through the β = 0 switch with
``find_unused_parameters=False``, calling release_dense_paths at the first step with β = 0, as a trainer would; and the
input observers of static activation scales merged over the ranks (check_observers)."""

from __future__ import annotations

import os

# VCON_DDP_FREEZE=1 forces freeze=True: the control run that shows why release_dense_paths does not freeze under DDP
FREEZE = {"freeze": True} if os.environ.get("VCON_DDP_FREEZE") == "1" else {}


def run(method: str, setting: dict, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from conftest import tiny_bert, tiny_inputs
    from hf_vcon import VConConfig, apply_vcon, get_vcon_state, release_dense_paths, set_step

    torch.manual_seed(0)
    model = apply_vcon(tiny_bert().train(), VConConfig(method=method, transition_steps=2, **setting))
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.1)
    frozen = {}
    for step in range(6):
        beta = set_step(ddp, step)
        if beta == 0.0 and not frozen:
            released = release_dense_paths(ddp, optimizer, **FREEZE)
            layers = dict(zip(get_vcon_state(model).targeted_module_names, get_vcon_state(model).layers))
            frozen = {name: layers[name].weight.detach().clone() for name in released} or {"none": None}
        inputs = tiny_inputs("bert", seed=100 * rank + step)  # different data on each rank
        labels = torch.tensor([0, 1])
        ddp(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise SystemExit(f"{method}: parameters differ between ranks")
    layers = dict(zip(get_vcon_state(model).targeted_module_names, get_vcon_state(model).layers))
    for name, snapshot in frozen.items():
        if snapshot is None:
            continue
        weight = layers[name].weight
        if not torch.equal(weight, snapshot) or weight in optimizer.state:
            raise SystemExit(f"{method}: released dense weight {name} changed or kept optimizer state")


def check_observers(rank: int, world: int) -> None:
    """FP8 static inputs, with gradient accumulation: after the per-step merge every rank's observers equal the max
    |x| each layer saw over all ranks' micro-batches (each rank sees other data; DDP's buffer broadcast at the
    first forward of a step comes right after the merge)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from conftest import tiny_bert, tiny_inputs
    from hf_vcon import VConConfig, apply_vcon, get_vcon_state, set_step
    from hf_vcon.patching.distributed import sync_input_observers

    torch.manual_seed(0)
    model = apply_vcon(tiny_bert().train(), VConConfig(method="quant", scheme="FP8", transition_steps=2))
    layers = get_vcon_state(model).layers
    seen = torch.zeros(len(layers))
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, index=index: seen.__setitem__(index, max(float(seen[index]), float(args[0].abs().max()))))
        for index, layer in enumerate(layers)]
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    for step in range(4):
        sync_input_observers(model)  # as the trainer's step hook does
        set_step(ddp, step)
        for micro in range(2):  # gradient accumulation: the first micro-batch under no_sync
            inputs = tiny_inputs("bert", seed=1000 * rank + 10 * step + micro)
            inputs["input_ids"] = inputs["input_ids"] * (rank + 1) % 99  # other ranges on each rank
            context = ddp.no_sync() if micro == 0 else torch.enable_grad()
            with context:
                ddp(**inputs, labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync_input_observers(model)
    for hook in hooks:
        hook.remove()
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    observed = torch.stack([layer.input_observer for layer in layers])
    if not torch.equal(observed, seen):
        raise SystemExit(f"observers {observed.tolist()} differ from the max over all ranks' inputs {seen.tolist()}")


def main() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for method, setting in [("lowrank", {"rank": 3}), ("prune", {"sparsity": 0.5}), ("binary", {})]:
        run(method, setting, rank, world)
    check_observers(rank, world)
    dist.barrier()
    dist.destroy_process_group()
    print(f"DDP OK rank {rank} pid {os.getpid()}")


if __name__ == "__main__":
    main()
