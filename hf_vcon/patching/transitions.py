"""How a model goes from dense to compressed over the transition: the *when*, apart from the *what* (compressors
never see a step, as a sparsifier in ``torch.ao.pruning`` never sees its scheduler).

- ``transition="vcon"`` (:class:`Blend`): the holders' β follow the schedule, β_t = max(1 − t/Q, 0) for the paper's
  linear one (each block in its own window with ``stagger``); the compression itself is fixed.
- ``transition="gmp"`` (:class:`Gradual`): gradual magnitude pruning (Zhu & Gupta 2017), the baseline VCON is
  compared with: no blending (β = 0); the compression in force is each layer's own setting with its gradual option
  (the sparsity) raised by the cubic ramp :func:`~hf_vcon.config.schedules.gmp_sparsity`, and only the weights it keeps
  receive gradient.
"""

from __future__ import annotations

from typing import Optional

from ..config.schedules import gmp_sparsity, holder_betas
from ..layers.protocol import DENSE, refresh_states
from .state import VConState


class Transition:
    def prepare(self, state: VConState) -> None:
        """Called once, when the model is patched."""

    def step(self, state: VConState, step: int, transition_steps: int) -> None:
        """Set what is in force at optimizer ``step`` (Q = ``transition_steps``)."""
        raise NotImplementedError

    def unfinished(self, state: VConState) -> Optional[str]:
        """Why the compression in force is not yet the one the model is headed for, or ``None`` if it is."""
        return None


class Blend(Transition):
    def step(self, state, step, transition_steps):
        config = state.config
        betas = holder_betas(step, transition_steps, len(state.holders), config.start_step, config.schedule,
                             config.stagger)
        for holder, beta in zip(state.holders, betas):
            if holder.beta != beta:  # once the transition is over, nothing changes: no work per layer
                holder.set_beta(beta)


class Gradual(Transition):
    def prepare(self, state):
        for layer in state.layers:
            layer.kept_only = True

    def step(self, state, step, transition_steps):
        for holder in state.holders:
            if holder.beta != 0.0:
                holder.set_beta(0.0)
        ramped = {}
        for layer, setting in zip(state.layers, state.settings):
            current = layer.compressor
            values = {option: gmp_sparsity(step, getattr(setting.options, option), transition_steps,
                                           state.config.start_step) for option in current.gradual_options()}
            if all(getattr(current.options, option) == value for option, value in values.items()):
                continue
            if id(current) not in ramped:  # one compressor per shared compressor and step (a setting's, or a layer's)
                ramped[id(current)] = (current, current.with_options(**values))
            layer.compressor = ramped[id(current)][1]
        if ramped:
            state.compression_version += 1

    def unfinished(self, state):
        for name, layer, setting in state.named_layers():
            for option in layer.compressor.gradual_options():
                current, target = getattr(layer.compressor.options, option), getattr(setting.options, option)
                if current < target:
                    return (f"layer {name!r} is at {option}={current:.4g}, not the {option}={target} it is being "
                            "raised to")
        return None


TRANSITIONS: dict[str, Transition] = {"vcon": Blend(), "gmp": Gradual()}


def transition_of(state: VConState) -> Transition:
    return TRANSITIONS[state.config.transition]


def set_state_step(state: VConState, step: int, max_steps: Optional[int] = None) -> float:
    """Put ``state``'s model where the transition has it at optimizer ``step``; return the mean β."""
    transition_of(state).step(state, step, state.config.resolve_transition_steps(max_steps))
    for layer in state.layers:
        layer.optimizer_step = step
    refresh_states(running_layers(state))
    return state.beta


def running_layers(state: VConState) -> list:
    """The compressed layers whose forward runs now: block-wise, those of the blocks that are not dense."""
    if not state.granularity.wraps_blocks:
        return state.layers
    return [layer for block in state.blocks if block.phase != DENSE for layer in block.compressed_layers()]
