"""hf_vcon: Vanishing Contributions (VCON, arXiv 2510.09696) compression for the Hugging Face stack.

Data flows one way: config → compressors → layers → model patching → trainer → export.
"""

from .version import __version__

# Configuration and schedules
from .config import VConConfig
from .schedules import beta_at

# Compressions
from .compressors import Compressor, available_compressors, register_compressor

# Layers and model verbs
from .layers import VConLinear
from .blocks import VConBlock, get_block_betas
from .model import (
    apply_vcon,
    compressed_view,
    get_beta,
    get_vcon_state,
    merge_and_unload,
    release_dense_paths,
    set_beta,
    set_step,
    unload,
)
from .summary import vcon_summary

# Training and export
from .trainer import VConCallback, VConTrainer
from .export import merged_state_dict, model_card, save_merged

# Compact checkpoints
from .compact import load_compressed, save_compressed
from .compressors.lowrank import LowRankLinear

# Errors
from .errors import IncompatibleCheckpointError, NoTargetModulesError, VConError, VConWarning

__all__ = [
    "__version__",
    "VConConfig",
    "beta_at",
    "Compressor",
    "available_compressors",
    "register_compressor",
    "VConLinear",
    "VConBlock",
    "get_block_betas",
    "apply_vcon",
    "get_beta",
    "get_vcon_state",
    "merge_and_unload",
    "release_dense_paths",
    "set_beta",
    "set_step",
    "unload",
    "vcon_summary",
    "compressed_view",
    "release_dense_paths",
    "VConCallback",
    "VConTrainer",
    "merged_state_dict",
    "model_card",
    "save_merged",
    "save_compressed",
    "load_compressed",
    "LowRankLinear",
    "IncompatibleCheckpointError",
    "NoTargetModulesError",
    "VConError",
    "VConWarning",
]
