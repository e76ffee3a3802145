"""Tiny models built from configs (no Hub) and the registry-driven method matrix shared by the tests.

Compressions that live outside the package register themselves from ``tests/plugins/*.py`` (each imported here),
so the matrix below covers them with no other edit.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from hf_vcon import VConConfig, available_compressors  # noqa: E402
from hf_vcon.compressors import compressor_class  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
# The tests live in one folder per stage of the package; some share fixtures and helpers by importing one another
# by module name (``from test_trainer import make_trainer``), so every stage folder is importable.
for _folder in sorted(os.listdir(TESTS)):
    if os.path.isfile(os.path.join(TESTS, _folder, "__init__.py")) or _folder in ("plugins", "data", "__pycache__"):
        continue
    if os.path.isdir(os.path.join(TESTS, _folder)) and os.path.join(TESTS, _folder) not in sys.path:
        sys.path.insert(0, os.path.join(TESTS, _folder))

PLUGINS = os.path.join(TESTS, "plugins")
for _plugin in pkgutil.iter_modules([PLUGINS]):
    importlib.import_module(f"plugins.{_plugin.name}")

# from_pretrained's dtype keyword (torch_dtype before transformers 4.56), as float32: transformers 4.x loads a
# compressed-tensors checkpoint in float16 unless told
DTYPE_KEY = "dtype" if tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
FLOAT32 = {DTYPE_KEY: torch.float32}

BUILT_IN = ("binary", "lowrank", "prune", "quant")
# Every registered method with the settings it declares (``example_options``): the matrix the tests run.
METHOD_SETTINGS = {method: [dict(options) for options in compressor_class(method).example_options]
                   for method in available_compressors()}
SETTING_CASES = [
    pytest.param(method, setting, id=f"{method}-{'-'.join(f'{k}={v}' for k, v in setting.items()) or 'default'}")
    for method in available_compressors()
    for setting in METHOD_SETTINGS[method]
]
METHOD_CASES = [pytest.param(method, METHOD_SETTINGS[method][0], id=method) for method in available_compressors()]


def _alone(case) -> bool:
    return not compressor_class(case.values[0]).couples_layers


def _shapes_kept(case) -> bool:
    return not compressor_class(case.values[0]).changes_shapes


# Tests that compress chosen layers on their own (a single Linear, query and value, fused experts) take the methods
# that compress a layer alone; a compression that couples layers (structured pruning) needs whole blocks and has the
# same properties checked on them in test_structured.py.
SOLO_SETTING_CASES = [case for case in SETTING_CASES if _alone(case)]
SOLO_METHOD_CASES = [case for case in METHOD_CASES if _alone(case)]
# The compact format stores every layer at the shape of the model's config: the methods that keep shapes.
SHAPE_KEEPING_SETTING_CASES = [case for case in SETTING_CASES if _shapes_kept(case)]
SHAPE_KEEPING_METHOD_CASES = [case for case in METHOD_CASES if _shapes_kept(case)]


def merged_shapes(original, model) -> dict:
    """The state-dict shapes a merged model must have: the base architecture's, with each compressed layer's weight
    and bias at the shapes its unit declares (smaller where the compression removes rows or columns)."""
    from hf_vcon import get_vcon_state

    state = get_vcon_state(model)
    shapes = {key: value.shape for key, value in original.state_dict().items()}
    for name, layer in zip(state.targeted_module_names, state.layers):
        weight, bias = layer.merged_tensors()
        shapes[layer.merged_key(name)] = layer.stored(weight).shape
        if bias is not None:
            shapes[f"{name}.bias"] = bias.shape
    return shapes


def vcon_config(method: str, setting: dict, **overrides) -> VConConfig:
    return VConConfig(method=method, **setting, **overrides)


def tiny_bert(num_labels: int = 3) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_vit(num_labels: int = 10) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_inputs(kind: str, batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    return {"input_ids": torch.randint(0, 99, (batch, 7), generator=generator)}


SEQ_LEN = 8


def close_process_group() -> None:
    """End a launched worker as every rank's last act: the Trainer leaves its gloo group alive, and torn down by the
    interpreter at exit it aborts a rank now and then ("terminate called without an active exception", SIGABRT)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class TinyTextDataset(torch.utils.data.Dataset):
    """Deterministic random token sequences; the label is a function of the first token, so it can be learnt."""

    def __init__(self, size: int = 32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, 99, (size, SEQ_LEN), generator=generator)
        self.labels = self.input_ids[:, 0] % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


MODEL_BUILDERS = {"bert": tiny_bert, "vit": tiny_vit, "gpt2": tiny_gpt2, "llama": tiny_llama}


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return MODEL_BUILDERS[kind]().eval()


def logits(model, kind: str, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(kind, seed=seed)).logits
