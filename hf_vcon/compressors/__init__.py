"""Compressions, one per file; importing this package registers them all."""

from . import binary, lowrank, prune  # noqa: F401  (registration happens on import)
from .base import CompressionStats, Compressor, available_compressors, get_compressor, register_compressor

__all__ = ["CompressionStats", "Compressor", "available_compressors", "get_compressor", "register_compressor"]
