"""β schedules: pure functions of the optimizer step.

β is the weight of the original path f; ``1 − β`` that of the compressed path g. Every schedule starts at
β = 1 (``t <= start_step``), reaches β = 0 at ``t = start_step + Q`` and stays there. Q = 0 is the post-shot
baseline: β = 0 from ``start_step`` on.

:func:`gmp_sparsity` is the ramp of the gradual magnitude pruning baseline (``transition="gmp"``): the degree of
compression (the sparsity) as a function of the step.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import VConWarning

if TYPE_CHECKING:
    from .vcon_config import VConConfig


def linear(progress: float) -> float:
    """The paper's schedule: β = 1 − p, i.e. β_t = max(1 − t/Q, 0) (arXiv 2510.09696, Eq. 2)."""
    return 1.0 - progress


def cosine(progress: float) -> float:
    """β = (1 + cos(π·p)) / 2: slow at both ends of the transition."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cubic(progress: float) -> float:
    """β = (1 − p)³: fast first, slow last; 1 − β is Zhu & Gupta's gradual-pruning curve."""
    return (1.0 - progress) ** 3


# Keyed by the names VConConfig accepts (config.SCHEDULES); a test keeps the two in step.
SCHEDULE_FUNCTIONS: dict[str, Callable[[float], float]] = {"linear": linear, "cosine": cosine, "cubic": cubic}


def transition_progress(step: int, transition_steps: int, start_step: int = 0) -> float:
    """p = clamp((step − start_step) / Q, 0, 1); with Q = 0, p jumps from 0 to 1 at ``start_step``."""
    if step < start_step:
        return 0.0
    if transition_steps <= 0:
        return 1.0
    return min((step - start_step) / transition_steps, 1.0)


def beta_at(step: int, transition_steps: int, start_step: int = 0, schedule: str = "linear") -> float:
    """β at optimizer step ``step`` for a transition of ``transition_steps`` (Q, in steps).

    Example:
        >>> beta_at(3, transition_steps=10)
        0.7
        >>> beta_at(12, transition_steps=10)
        0.0
    """
    progress = transition_progress(step, transition_steps, start_step)
    if progress >= 1.0:
        return 0.0  # exact 0, whatever rounding the curve has at p = 1
    return SCHEDULE_FUNCTIONS[schedule](progress)


def staggered_beta_at(
    step: int, transition_steps: int, index: int, count: int, start_step: int = 0, schedule: str = "linear"
) -> float:
    """β of block ``index`` of ``count`` blocks that hand over one after another (block-wise VCON, Figure 2).

    The transition ``[start_step, start_step + Q]`` is split into ``count`` equal consecutive windows; block k
    runs the whole schedule inside its own window ``[start_step + k·Q/n, start_step + (k+1)·Q/n]``: its progress
    is ``p_k = clamp(n·p − k, 0, 1)`` with p the progress of the whole transition. Before its window a block
    has β = 1, after it β = 0; with Q = 0 every block is at β = 0 from ``start_step`` on.

    Example:
        >>> [staggered_beta_at(5, 10, index, 2) for index in (0, 1)]
        [0.0, 1.0]
        >>> [staggered_beta_at(6, 10, index, 2) for index in (0, 1)]
        [0.0, 0.8]
    """
    if not 0 <= index < count:
        raise ValueError(f"index={index!r} must be in [0, count={count}).")
    progress = min(max(transition_progress(step, transition_steps, start_step) * count - index, 0.0), 1.0)
    if progress >= 1.0:
        return 0.0
    return SCHEDULE_FUNCTIONS[schedule](progress)


def holder_betas(step: int, transition_steps: int, count: int, start_step: int = 0, schedule: str = "linear",
                 stagger: bool = False) -> list[float]:
    """β of each of ``count`` holders at ``step``: one after another in windows (:func:`staggered_beta_at`) with
    ``stagger``, else all at :func:`beta_at`.

    Example:
        >>> holder_betas(6, 10, 2, stagger=True)
        [0.0, 0.8]
    """
    if stagger:
        return [staggered_beta_at(step, transition_steps, index, count, start_step, schedule) for index in range(count)]
    return [beta_at(step, transition_steps, start_step, schedule)] * count


def gmp_sparsity(step: int, sparsity: float, transition_steps: int, start_step: int = 0) -> float:
    """Sparsity of gradual magnitude pruning (Zhu & Gupta 2017, Eq. 1) at optimizer step ``step``.

    ``s_t = s·(1 − (1 − p)³)`` with p = clamp((t − start_step)/Q, 0, 1): 0 until ``start_step``, the final
    sparsity ``s`` from ``start_step + Q`` on, rising fast first and slowly last. Q = 0 prunes to ``s`` at once.

    Example:
        >>> gmp_sparsity(5, sparsity=0.5, transition_steps=10)
        0.4375
        >>> gmp_sparsity(10, sparsity=0.5, transition_steps=10)
        0.5
    """
    progress = transition_progress(step, transition_steps, start_step)
    if progress >= 1.0:
        return float(sparsity)  # exact s at the end of the ramp
    return sparsity * (1.0 - cubic(progress))


def transition_end(config: VConConfig, max_steps: Optional[int]) -> Optional[int]:
    """The optimizer step at which β reaches 0 (``start_step + Q``); ``None`` if Q is a fraction of an unknown run."""
    if not isinstance(config.transition_steps, int) and not max_steps:
        return None
    return config.start_step + config.resolve_transition_steps(max_steps)


def beta_after(config: VConConfig, steps: int, max_steps: Optional[int]) -> float:
    """β after ``steps`` optimizer steps by the config's schedule (block-wise with ``stagger``, the blocks differ)."""
    if config.transition == "gmp":
        return 0.0
    return beta_at(steps, config.resolve_transition_steps(max_steps), config.start_step, config.schedule)


def warn_if_transition_outlasts_run(config: VConConfig, max_steps: Optional[int], stacklevel: int = 3) -> bool:
    """Warn, before training, when the transition ends after the run's last step; return whether it does."""
    end = transition_end(config, max_steps)
    if not max_steps or end is None or end <= max_steps:
        return False
    left = (f"β = {beta_after(config, max_steps, max_steps):.4g} at the last step" if config.transition != "gmp"
            else "the sparsity ramp unfinished")
    warnings.warn(
        f"The transition ends at optimizer step {end} (start_step {config.start_step} + transition_steps "
        f"{config.transition_steps!r}), after the last of this run's {max_steps} steps: training stops with {left}. "
        "The saved model is the compressed model (β = 0), which training never ran as such. Lower transition_steps "
        "(a float is a fraction of the run, 0.2 by default) or train longer.",
        VConWarning,
        stacklevel=stacklevel,
    )
    return True
