"""Compressions, one per file, behind the contract of :mod:`.base`; importing this package registers the built-in
ones (third-party ones register on import, or through the ``hf_vcon.compressors`` entry points)."""

from . import binary, lowrank, prune, quant, structured  # noqa: F401  (registration happens on import)
from .base import CompressionStats, Compressor, FactorCompressor, IntegerScheme, IntegerWeight, WeightCompressor
from .options import CompressorOptions, option
from .registry import available_compressors, compressor_class, register_compressor

__all__ = [
    "CompressionStats",
    "Compressor",
    "CompressorOptions",
    "FactorCompressor",
    "IntegerScheme",
    "IntegerWeight",
    "WeightCompressor",
    "available_compressors",
    "compressor_class",
    "option",
    "register_compressor",
]
