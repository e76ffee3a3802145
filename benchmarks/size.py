"""Checkpoint sizes against fp32, per method, on BERT-base shapes: the compact format (``hf_vcon.save_compressed``)
and the compressed-tensors checkpoint (``save_merged(format="compressed-tensors")``, the quantized methods).

For the targeted layers, the bytes of their stored tensors (read from the safetensors headers) against their weights
in fp32; for the whole model, the folder against ``save_pretrained`` of the merged dense model. The low-rank bound
is r(m+n)/(mn) summed over the targeted layers.

    python benchmarks/size.py --layers 12
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from hf_vcon import VConConfig, apply_vcon, get_vcon_state, save_compressed, save_merged  # noqa: E402
from hf_vcon.export.compact_save import COMPACT_WEIGHTS_NAME, PACKED_INFIX  # noqa: E402
from hf_vcon.export.merged import stored_sizes  # noqa: E402

SETTINGS = {
    "binary (tensor scale)": dict(method="binary"),
    "binary (channel scales)": dict(method="binary", binary_scale="channel"),
    "lowrank (rank_ratio 0.25)": dict(method="lowrank", rank_ratio=0.25),
    "prune (sparsity 0.9)": dict(method="prune", sparsity=0.9),
    "prune (2:4)": dict(method="prune", prune_pattern="2:4"),
}
TARGETS = {"binary (tensor scale)": "<= 1/28 = 0.0357", "binary (channel scales)": "<= 1/28 = 0.0357"}
# compressed-tensors pack-quantized; expected ≈ bits/32 plus the scales
CT_SETTINGS = {
    "int8, channel scales": (dict(method="quant", bits=8, strategy="channel"), "≈ 0.25"),
    "int4, group-128 scales": (dict(method="quant", bits=4, strategy="group", group_size=128), "≈ 0.13"),
    "int3, group-128 scales": (dict(method="quant", bits=3, strategy="group", group_size=128), "≈ 0.10"),
    "int2, channel scales": (dict(method="quant", bits=2, strategy="channel"), "≈ 0.07"),
    "binary (as int2, tensor scale)": (dict(method="binary"), "≈ 0.07"),
    # the float formats: FP8 one byte per weight; NVFP4 half a byte + an FP8 scale per 16 (+ a float32 global scale);
    # MXFP4 half a byte + an E8M0 byte per 32
    "FP8_DYNAMIC (fp8 e4m3, channel scales)": (dict(method="quant", scheme="FP8_DYNAMIC"), "≈ 0.25"),
    "W8A8 (int8, channel scales)": (dict(method="quant", scheme="W8A8"), "≈ 0.25"),
    "NVFP4A16 (e2m1, fp8 scales per 16)": (dict(method="quant", scheme="NVFP4A16"), "≈ 0.14"),
    "MXFP4A16 (e2m1, e8m0 scales per 32)": (dict(method="quant", scheme="MXFP4A16"), "≈ 0.133"),
}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def packed_bytes(folder: str) -> int:
    with safe_open(os.path.join(folder, COMPACT_WEIGHTS_NAME), framework="pt") as handle:
        return sum(_nbytes(handle, key) for key in handle.keys() if PACKED_INFIX in key)


def _nbytes(handle, key: str) -> int:
    tensor_slice = handle.get_slice(key)
    numel = 1
    for size in tensor_slice.get_shape():
        numel *= size
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "BOOL": 1}[tensor_slice.get_dtype()]
    return numel * itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=args.layers)
    dense = BertForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as folder:
        dense.save_pretrained(folder)
        dense_total = folder_bytes(folder)
    print(f"# BERT-base shapes, {args.layers} layers, all-linear targets; dense fp32 save_pretrained: "
          f"{dense_total / 2**20:.1f} MiB\n")
    print("| setting | targeted fp32 | targeted compact | compact / fp32 | bound / target | whole folder | folder / dense |")
    print("|---|---|---|---|---|---|---|")
    for label, kwargs in SETTINGS.items():
        model = apply_vcon(copy.deepcopy(dense), VConConfig(**kwargs))  # same weights for every method
        layers = get_vcon_state(model).layers
        fp32 = sum(4 * layer.weight.numel() for layer in layers)
        bound = TARGETS.get(label, "")
        if kwargs["method"] == "lowrank":
            ranks = [layer.vcon_A.shape[0] for layer in layers]
            exact = sum(r * (l.in_features + l.out_features) for r, l in zip(ranks, layers)) / sum(
                l.in_features * l.out_features for l in layers)
            bound = f"r(m+n)/(mn) = {exact:.4f}; target <= {exact + 0.01:.4f}"
        with tempfile.TemporaryDirectory() as folder:
            save_compressed(model, folder)
            packed, total = packed_bytes(folder), folder_bytes(folder)
        print(f"| {label} | {fp32 / 2**20:.1f} MiB | {packed / 2**20:.2f} MiB | {packed / fp32:.4f} | {bound} | "
              f"{total / 2**20:.1f} MiB | {total / dense_total:.3f} |", flush=True)
    compressed_tensors_table(dense, dense_total)


def compressed_tensors_table(dense, dense_total: int) -> None:
    print("\n# compressed-tensors checkpoints (pack-quantized, float-quantized, int-quantized, nvfp4/mxfp4-pack-quantized): "
          "save_merged(model, folder, format='compressed-tensors')\n")
    print("| setting | targeted fp32 | targeted as stored | stored / fp32 | expected | whole folder | folder / dense |")
    print("|---|---|---|---|---|---|---|")
    for label, (kwargs, expected) in CT_SETTINGS.items():
        model = apply_vcon(copy.deepcopy(dense), VConConfig(transition_steps=0, **kwargs))
        state = get_vcon_state(model)
        fp32 = sum(4 * layer.weight.numel() for layer in state.layers)
        with tempfile.TemporaryDirectory() as folder:
            save_merged(model, folder, format="compressed-tensors")
            targeted, _ = stored_sizes(folder, state.targeted_module_names)
            total = folder_bytes(folder)
        print(f"| {label} | {fp32 / 2**20:.1f} MiB | {targeted / 2**20:.2f} MiB | {targeted / fp32:.4f} | {expected} | "
              f"{total / 2**20:.1f} MiB | {total / dense_total:.3f} |", flush=True)


if __name__ == "__main__":
    main()
