"""hf_vcon: Vanishing Contributions (VCON, arXiv 2510.09696) compression for the Hugging Face stack.

The folders are the stages of the data flow, and imports point down their order (a test keeps it so):
``utils`` ← ``compressors`` ← ``config`` ← ``layers`` ← ``patching`` ← ``integrations`` ← ``distill`` ← ``export`` ←
``training``. This module gathers the public API; internal module paths may change between 0.x releases.
"""

from .version import __version__

# Configuration and schedules
from .config.vcon_config import VConConfig
from .config.schedules import beta_at
from .config.settings import LayerSetting

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
from .compressors.structured.couplings import HeadCoupling, NeuronCoupling, register_coupling

# Layers and model verbs
from .layers.linear import VConLinear
from .layers.block import VConBlock
from .patching.blockwise import get_block_betas
from .patching.state import VConState, get_vcon_state
from .patching.verbs import (
    apply_vcon,
    compressed_view,
    get_beta,
    merge_and_unload,
    release_dense_paths,
    set_beta,
    set_step,
    unload,
)
from .patching.summary import vcon_summary

# Training and export
from .training.trainer import VConCallback, VConTrainer
from .distill.losses import DistillationConfig, kd_loss
from .distill.mixin import DistillationMixin
from .distill.cached_logits import TeacherLogits, add_teacher_index, cache_teacher_logits
from .export.merged import merged_state_dict, save_merged
from .export.card import model_card
from .export.compact_save import save_compressed
from .export.compact_load import load_compressed
from .export.from_checkpoint import export_checkpoint, load_training_checkpoint

# PEFT adapters on VCON layers
from .integrations.peft import get_peft_model

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
