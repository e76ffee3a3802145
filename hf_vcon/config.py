"""``VConConfig``: what to compress, how, and over how many optimizer steps.

One dataclass, validated on construction, written to and read from ``vcon_config.json`` with a version stamp.
Each field is documented once, in the class docstring.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

from .errors import VConWarning
from .version import __version__

CONFIG_NAME = "vcon_config.json"

SCHEDULES = ("cosine", "cubic", "linear")
TRANSITIONS = ("gmp", "vcon")
PRUNE_PATTERNS = ("layer", "row", "N:M")
BINARY_SCALES = ("channel", "tensor")
GRANULARITIES = ("block", "layer")

DEFAULT_SPARSITY = 0.9
DEFAULT_PRUNE_PATTERN = "layer"
DEFAULT_BINARY_SCALE = "tensor"

# Options that only one method reads; giving them with another method is a mistake worth an error.
METHOD_ONLY_FIELDS = {
    "sparsity": "prune",
    "prune_pattern": "prune",
    "rank": "lowrank",
    "rank_ratio": "lowrank",
    "binary_scale": "binary",
}

ALL_LINEAR = "all-linear"

_N_M_PATTERN = re.compile(r"^\s*(\S+)\s*:\s*(\S+)\s*$")


def parse_n_m(pattern: str) -> tuple[int, int]:
    """Parse an ``"N:M"`` prune pattern such as ``"2:4"`` into ``(2, 4)``.

    Raises:
        ValueError: if the string is not two integers ``0 < N < M`` separated by a colon.
    """
    match = _N_M_PATTERN.match(pattern)
    if match is None or not all(part.isdigit() for part in match.groups()):
        raise ValueError(
            f"prune_pattern={pattern!r} is not valid: use 'layer', 'row', or 'N:M' with integers 0 < N < M, "
            "such as '2:4'."
        )
    n, m = (int(part) for part in match.groups())
    if not 0 < n < m:
        raise ValueError(f"prune_pattern={pattern!r} is not valid: an N:M pattern needs 0 < N < M, such as '2:4'.")
    return n, m


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class VConConfig:
    """Configuration of Vanishing Contributions (VCON, arXiv 2510.09696).

    Each targeted layer outputs ``β·f(x) + (1−β)·g(x)``, f the original layer, g its compressed form, with
    ``β = max(1 − (t − start_step)/Q, 0)`` over optimizer steps t for the linear schedule.

    Args:
        method: the compression g: ``"prune"`` (magnitude pruning), ``"binary"`` (sign(W)·mean|W|) or
            ``"lowrank"`` (truncated SVD factors B·A).
        target_modules: which Linear/Conv1D modules get VCON, in PEFT's grammar: a list of module names, each
            matching a full name or a dotted suffix; a string, used as a regex ``re.fullmatch``-ed against the
            full module name; or ``"all-linear"`` (every Linear/Conv1D except the output head).
        exclude_modules: modules to leave alone, in the same grammar (``"all-linear"`` excepted).
        transition_steps: Q. An ``int`` is a number of optimizer steps; a ``float`` in (0, 1] is a fraction of the
            run's ``max_steps`` (resolved when training starts); ``0`` is the post-shot baseline (β = 0 at once).
        start_step: β stays 1 until this optimizer step, then the transition starts.
        schedule: the shape of β over the transition: ``"linear"`` (the paper), ``"cosine"`` or ``"cubic"``.
        transition: how the model goes from dense to compressed over Q. ``"vcon"`` (default) blends the two paths
            with β as above. ``"gmp"`` (prune only, ``"layer"``/``"row"`` patterns) is the gradual magnitude pruning
            baseline of Zhu & Gupta (2017): no blending (β = 0), a hard mask whose sparsity rises as
            ``s_t = s·(1 − (1 − p)³)``, p = (t − start_step)/Q clamped to [0, 1], and pruned weights get no
            gradient (with ``"vcon"`` and post-shot the latent W is trained straight-through, as the paper does);
            ``schedule`` does not apply.
        sparsity: prune only; the fraction of weights set to zero, in [0, 1). Defaults to 0.9. Implied by an
            ``N:M`` pattern (1 − N/M) and may then be omitted.
        prune_pattern: prune only; ``"layer"`` (unstructured, per layer), ``"row"`` (the same fraction in every
            output row) or ``"N:M"`` such as ``"2:4"`` (N non-zeros in every M consecutive inputs).
        rank: lowrank only; the absolute rank r of every targeted layer. Give exactly one of rank and rank_ratio.
        rank_ratio: lowrank only; r as a fraction in (0, 1) of ``min(in_features, out_features)`` of each layer.
        binary_scale: binary only; ``"tensor"`` (one mean|W| per weight) or ``"channel"`` (one per output row).
        recompute_every: prune and binary; recompute what C(W) needs besides W (the pruning cut, the scale) every
            this many optimizer steps. 1 (the default, as the paper) recomputes it once per optimizer step, never
            per micro-batch; k > 1 trades freshness of the mask/scale for speed (``benchmarks/overhead.py``
            shows the cost) and needs the step from :func:`hf_vcon.set_step` (the trainer calls it).
        granularity: what one VCON unit is: ``"layer"`` (default; every targeted Linear blends its weights) or
            ``"block"`` (each block of ``target_blocks`` blends its outputs ``β·f(x) + (1−β)·g(x)``, g a compressed
            copy of the block whose ``target_modules`` Linears are compressed; see :mod:`hf_vcon.blocks`).
        target_blocks: block granularity only (and required there): the blocks, in the grammar of
            ``target_modules`` (``"all-linear"`` excepted), e.g. ``r"bert\\.encoder\\.layer\\.\\d+"``.
        stagger: block granularity only; ``True`` splits the transition Q into one window of Q/n steps per block,
            so the n blocks hand over one after another (Figure 2 of the paper); ``False`` moves them together.
        block_order: with ``stagger=True`` only; the full names of every matched block in the order they hand
            over. Default: model order, first to last.

    Raises:
        ValueError / TypeError: on construction, naming the offending field and the accepted values.

    Example:
        >>> from hf_vcon import VConConfig
        >>> VConConfig(method="prune", sparsity=0.5, transition_steps=100).sparsity
        0.5
    """

    method: str = "prune"
    target_modules: Union[str, list[str], None] = "all-linear"
    exclude_modules: Union[str, list[str], None] = None
    transition_steps: Union[int, float] = 0.2
    start_step: int = 0
    schedule: str = "linear"
    transition: str = "vcon"
    sparsity: Optional[float] = None
    prune_pattern: Optional[str] = None
    rank: Optional[int] = None
    rank_ratio: Optional[float] = None
    binary_scale: Optional[str] = None
    recompute_every: int = 1
    granularity: str = "layer"
    target_blocks: Union[str, list[str], None] = None
    stagger: bool = False
    block_order: Optional[list[str]] = None

    def __post_init__(self) -> None:
        self._check_method()
        self._check_method_only_fields()
        self._check_targets()
        self._check_schedule()
        self._check_prune()
        self._check_lowrank()
        self._check_binary()
        self._check_recompute_every()
        self._check_granularity()
        self._check_transition()

    # ----------------------------------------------------------------------------------------- validation
    def _check_method(self) -> None:
        # The registry is the one list of methods: a new compressor file makes its name valid here.
        from .compressors import available_compressors

        if self.method not in available_compressors():
            raise ValueError(f"method={self.method!r} is not known; use one of: {', '.join(available_compressors())}.")

    def _check_method_only_fields(self) -> None:
        for field, owner in METHOD_ONLY_FIELDS.items():
            if getattr(self, field) is not None and self.method != owner:
                raise ValueError(
                    f"{field}={getattr(self, field)!r} only applies to method='{owner}', but method={self.method!r}; "
                    f"remove {field} or set method='{owner}'."
                )

    def _check_targets(self) -> None:
        if self.target_modules is None:
            raise ValueError("target_modules is required: a list of module names, a regex string, or 'all-linear'.")
        self.target_modules = self._checked_targets("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            if self.exclude_modules == ALL_LINEAR:
                raise ValueError("exclude_modules='all-linear' would exclude everything; name modules instead.")
            self.exclude_modules = self._checked_targets("exclude_modules", self.exclude_modules)

    @staticmethod
    def _checked_targets(field: str, value: Any) -> Union[str, list[str]]:
        """``value`` of a target-grammar ``field`` as a list or a valid regex string (tuples and sets → lists)."""
        if isinstance(value, (tuple, set)):
            value = sorted(value) if isinstance(value, set) else list(value)
        if isinstance(value, str):
            if value != ALL_LINEAR:
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"{field}={value!r} is not a valid regular expression: {err}.") from None
        elif isinstance(value, list):
            if not value or not all(isinstance(item, str) and item for item in value):
                raise TypeError(f"{field}={value!r} must be a non-empty list of module names (strings).")
        else:
            raise TypeError(
                f"{field} must be a list of module names, a regex string or 'all-linear', not {type(value).__name__}."
            )
        return value

    def _check_schedule(self) -> None:
        q = self.transition_steps
        if not _is_number(q) or (isinstance(q, float) and not math.isfinite(q)):
            raise TypeError(
                f"transition_steps={q!r} must be an int (optimizer steps), a float in (0, 1] (a fraction of max_steps) "
                "or 0 (post-shot)."
            )
        if q < 0:
            raise ValueError(f"transition_steps={q!r} must be >= 0 (0 means post-shot: compress at once).")
        if isinstance(q, float):
            if q > 1:
                raise ValueError(
                    f"transition_steps={q!r}: a float is a fraction of max_steps and must be in (0, 1]; "
                    f"pass an int ({int(q)}) for a number of optimizer steps."
                )
            if q == 0:
                self.transition_steps = 0
        if not isinstance(self.start_step, int) or isinstance(self.start_step, bool) or self.start_step < 0:
            raise ValueError(f"start_step={self.start_step!r} must be an int >= 0 (an optimizer step).")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not known; use one of: {', '.join(SCHEDULES)}.")

    def _check_prune(self) -> None:
        if self.method != "prune":
            return
        if self.prune_pattern is None:
            self.prune_pattern = DEFAULT_PRUNE_PATTERN
        if not isinstance(self.prune_pattern, str):
            raise TypeError(f"prune_pattern={self.prune_pattern!r} must be 'layer', 'row' or an 'N:M' string.")
        if self.prune_pattern in ("layer", "row"):
            if self.sparsity is None:
                self.sparsity = DEFAULT_SPARSITY
            if not _is_number(self.sparsity) or not 0 <= self.sparsity < 1:
                raise ValueError(f"sparsity={self.sparsity!r} must be a number in [0, 1): the fraction of weights set to zero.")
            self.sparsity = float(self.sparsity)
            return
        n, m = parse_n_m(self.prune_pattern)
        self.prune_pattern = f"{n}:{m}"
        implied = 1 - n / m
        if self.sparsity is None:
            self.sparsity = implied
        elif not _is_number(self.sparsity) or not math.isclose(self.sparsity, implied):
            raise ValueError(
                f"sparsity={self.sparsity!r} contradicts prune_pattern={self.prune_pattern!r}, which implies "
                f"sparsity={implied}; omit sparsity with an N:M pattern."
            )

    def _check_lowrank(self) -> None:
        if self.method != "lowrank":
            return
        if (self.rank is None) == (self.rank_ratio is None):
            raise ValueError(
                "method='lowrank' needs exactly one of rank (an int > 0) and rank_ratio (a float in (0, 1)); "
                f"got rank={self.rank!r}, rank_ratio={self.rank_ratio!r}."
            )
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0):
            raise ValueError(f"rank={self.rank!r} must be an int > 0.")
        if self.rank_ratio is not None and (not _is_number(self.rank_ratio) or not 0 < self.rank_ratio < 1):
            raise ValueError(f"rank_ratio={self.rank_ratio!r} must be a number in (0, 1): a fraction of min(in, out).")

    def _check_binary(self) -> None:
        if self.method != "binary":
            return
        if self.binary_scale is None:
            self.binary_scale = DEFAULT_BINARY_SCALE
        if self.binary_scale not in BINARY_SCALES:
            raise ValueError(f"binary_scale={self.binary_scale!r} is not known; use one of: {', '.join(BINARY_SCALES)}.")

    def _check_recompute_every(self) -> None:
        every = self.recompute_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"recompute_every={every!r} must be an int >= 1 (optimizer steps between mask/scale updates).")
        from .compressors.base import compressor_class

        if every != 1 and not compressor_class(self.method).straight_through:
            raise ValueError(
                f"recompute_every={every} only applies to methods whose compressed weight is recomputed from W "
                f"(prune, binary), not method={self.method!r}; remove it."
            )

    def _check_granularity(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={self.granularity!r} is not known; use one of: {', '.join(GRANULARITIES)}."
            )
        block_wise = self.granularity == "block"
        if not block_wise:
            for field in ("target_blocks", "block_order"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"{field}={getattr(self, field)!r} only applies to granularity='block', but "
                        f"granularity={self.granularity!r}; remove {field} or set granularity='block'."
                    )
        if not isinstance(self.stagger, bool):
            raise TypeError(f"stagger={self.stagger!r} must be True or False.")
        if self.stagger and not block_wise:
            raise ValueError(
                f"stagger=True only applies to granularity='block', but granularity={self.granularity!r}; "
                "set granularity='block' and target_blocks."
            )
        if not block_wise:
            return
        if self.target_blocks is None:
            raise ValueError(
                "granularity='block' needs target_blocks: the blocks' module names (a list of names or dotted "
                "suffixes) or a regex such as r'bert\\.encoder\\.layer\\.\\d+'."
            )
        if self.target_blocks == ALL_LINEAR:
            raise ValueError("target_blocks='all-linear' is not a set of blocks; name the blocks or give a regex.")
        self.target_blocks = self._checked_targets("target_blocks", self.target_blocks)
        if self.block_order is not None:
            if not self.stagger:
                raise ValueError(
                    f"block_order={self.block_order!r} only applies with stagger=True; set stagger=True or remove it."
                )
            order = self.block_order
            if isinstance(order, tuple):
                order = self.block_order = list(order)
            if not isinstance(order, list) or not order or not all(isinstance(name, str) and name for name in order):
                raise TypeError(f"block_order={order!r} must be a non-empty list of block names (strings).")
            repeated = sorted({name for name in order if order.count(name) > 1})
            if repeated:
                raise ValueError(f"block_order={order!r} names {repeated} more than once; name every block once.")

    def _check_transition(self) -> None:
        if self.transition not in TRANSITIONS:
            raise ValueError(f"transition={self.transition!r} is not known; use one of: {', '.join(TRANSITIONS)}.")
        if self.transition != "gmp":
            return
        if self.method != "prune":
            raise ValueError(
                f"transition='gmp' (gradual magnitude pruning) only applies to method='prune', but method={self.method!r}; "
                "use transition='vcon' or method='prune'."
            )
        if self.prune_pattern not in ("layer", "row"):
            raise ValueError(
                f"transition='gmp' raises the sparsity gradually, which prune_pattern={self.prune_pattern!r} (a fixed "
                "N:M sparsity) cannot do; use prune_pattern='layer' or 'row', or transition='vcon'."
            )
        if self.granularity != "layer":
            raise ValueError(
                f"transition='gmp' prunes layer by layer and does not blend blocks; remove granularity={self.granularity!r} "
                "or use transition='vcon'."
            )
        if self.schedule != "linear":
            raise ValueError(
                f"schedule={self.schedule!r} shapes β, which transition='gmp' does not use (its sparsity follows Zhu & "
                "Gupta's cubic ramp); remove schedule or use transition='vcon'."
            )

    # ------------------------------------------------------------------------------------------ schedule
    def resolve_transition_steps(self, max_steps: Optional[int] = None) -> int:
        """Q in optimizer steps: an int as given, a float fraction times ``max_steps`` (rounded).

        Raises:
            ValueError: if Q is a fraction and ``max_steps`` is unknown or not positive.
        """
        if isinstance(self.transition_steps, int):
            return self.transition_steps
        if max_steps is None or max_steps <= 0:
            raise ValueError(
                f"transition_steps={self.transition_steps} is a fraction of the run and needs max_steps > 0 "
                f"(got {max_steps!r}); pass an int number of optimizer steps instead."
            )
        return max(1, round(self.transition_steps * max_steps))

    # ---------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict, stamped with the hf_vcon version."""
        data = dataclasses.asdict(self)
        data["hf_vcon_version"] = __version__
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VConConfig":
        """Build a config from a dict; unknown keys are ignored with a ``VConWarning``."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"hf_vcon_version"})
        if unknown:
            warnings.warn(
                f"Ignoring unknown VConConfig keys {unknown} (written by hf_vcon {data.get('hf_vcon_version', '?')}, "
                f"read by {__version__}).",
                VConWarning,
                stacklevel=2,
            )
        return cls(**{key: value for key, value in data.items() if key in known})

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``vcon_config.json`` into ``save_directory`` (created if needed); returns the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **hub_kwargs: Any) -> "VConConfig":
        """Read ``vcon_config.json`` from a local folder, the file itself, or a Hub repo id.

        ``hub_kwargs`` (``revision``, ``token``, ``cache_dir``…) go to ``huggingface_hub.hf_hub_download``.
        """
        path = os.fspath(path)
        if os.path.isfile(path):
            file = path
        elif os.path.isdir(path):
            file = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"No {CONFIG_NAME} in {path!r}: it was not saved with hf_vcon.")
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, CONFIG_NAME, **hub_kwargs)
        with open(file, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))
