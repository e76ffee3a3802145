"""hf_vcon: Vanishing Contributions (VCON, arXiv 2510.09696) compression for the Hugging Face stack.

Data flows one way: config → compressors → layers → model patching → trainer → export. Imports follow it:
``compressors`` (the registry imports nothing) ← ``config`` ← ``state`` (the core) ← ``layerwise`` / ``blocks`` ←
``model`` ← ``summary``, ``export``, ``compact`` ← ``trainer``.
"""

from .version import __version__

# Configuration and schedules
from .config import VConConfig
from .schedules import beta_at
from .settings import LayerSetting

# Compressions
from .compressors import (
    Compressor,
    CompressorOptions,
    FactorCompressor,
    WeightCompressor,
    available_compressors,
    register_compressor,
)
from .compressors.lowrank import LowRankLinear
from .couplings import HeadCoupling, NeuronCoupling, register_coupling

# Layers and model verbs
from .layers import VConLinear
from .blocks import VConBlock, get_block_betas
from .state import VConState, get_vcon_state
from .model import (
    apply_vcon,
    compressed_view,
    get_beta,
    merge_and_unload,
    release_dense_paths,
    set_beta,
    set_step,
    unload,
)
from .summary import vcon_summary

# Training and export
from .trainer import VConCallback, VConTrainer
from .distill import DistillationConfig, kd_loss
from .distill_trainer import DistillationMixin
from .teacher_logits import TeacherLogits, add_teacher_index, cache_teacher_logits
from .export import merged_state_dict, save_merged
from .card import model_card
from .compact import save_compressed
from .compact_load import load_compressed
from .checkpoint_export import export_checkpoint, load_training_checkpoint

# PEFT adapters on VCON layers
from .adapters import get_peft_model

# Errors
from .errors import IncompatibleCheckpointError, NoTargetModulesError, UnsupportedLayerError, VConError, VConWarning

__all__ = [
    "__version__",
    "VConConfig",
    "beta_at",
    "LayerSetting",
    "Compressor",
    "CompressorOptions",
    "FactorCompressor",
    "WeightCompressor",
    "available_compressors",
    "register_compressor",
    "LowRankLinear",
    "HeadCoupling",
    "NeuronCoupling",
    "register_coupling",
    "VConLinear",
    "VConBlock",
    "get_block_betas",
    "VConState",
    "get_vcon_state",
    "apply_vcon",
    "compressed_view",
    "get_beta",
    "merge_and_unload",
    "release_dense_paths",
    "set_beta",
    "set_step",
    "unload",
    "vcon_summary",
    "VConCallback",
    "VConTrainer",
    "DistillationConfig",
    "DistillationMixin",
    "kd_loss",
    "cache_teacher_logits",
    "add_teacher_index",
    "TeacherLogits",
    "merged_state_dict",
    "save_merged",
    "model_card",
    "save_compressed",
    "load_compressed",
    "export_checkpoint",
    "load_training_checkpoint",
    "get_peft_model",
    "IncompatibleCheckpointError",
    "NoTargetModulesError",
    "UnsupportedLayerError",
    "VConError",
    "VConWarning",
]
