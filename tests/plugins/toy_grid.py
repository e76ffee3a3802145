"""A compression from outside the package: weights rounded to a grid, C = step·round(W/step).

It is the proof that a compression is one file and one registration: the conftest imports this folder, and every
registry-driven test (β = 1 ≡ original, β = 0 ≡ merged, save/load round trips, summary, trainer) runs on it with
no other edit. It keeps every default of the contract: C stored dense in the compact format, no smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_vcon import CompressorOptions, WeightCompressor, register_compressor
from hf_vcon.compressors.options import check_number, option


@dataclass(frozen=True)
class GridOptions(CompressorOptions):
    step: float = option(0.05, "the grid spacing of C = step·round(W/step), > 0")

    def validate(self) -> None:
        check_number("step", self.step, 0.0, low_open=True, meaning="a grid spacing")


@register_compressor("toygrid")
class GridRounder(WeightCompressor):
    Options = GridOptions
    example_options = ({}, {"step": 0.02})

    def compress(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.round(weight / self.options.step) * self.options.step
