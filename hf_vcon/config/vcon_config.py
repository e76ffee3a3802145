"""``VConConfig``: what to compress, how, and over how many optimizer steps.

One dataclass, validated on construction, written to and read from ``vcon_config.json`` with a version stamp.
The fields common to every compression are documented in the class docstring; each method's options are
documented, and validated, next to its maths (``hf_vcon/compressors/<method>.py``) and reached through the
registry, so a new compression needs no edit here.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..compressors import CompressorOptions, compressor_class
from ..compressors import available_compressors as _methods
from ..compressors.options import is_number
from ..errors import VConWarning
from ..version import __version__
from .settings import LayerSetting, build_options, option_owners, parse_overrides, unexpected_option
from .targets import ALL_LINEAR, matches_pattern

CONFIG_NAME = "vcon_config.json"
FORMAT_VERSION = 2  # 1: options as flat fields (hf_vcon 0.1); 2: "options" and "module_overrides"

SCHEDULES = ("cosine", "cubic", "linear")
TRANSITIONS = ("gmp", "vcon")
GRANULARITIES = ("block", "layer")

Targets = Union[str, list[str], None]


@dataclass(init=False)
class VConConfig:
    """Configuration of Vanishing Contributions (VCON, arXiv 2510.09696).

    Each targeted layer outputs ``β·f(x) + (1−β)·g(x)``, f the original layer, g its compressed form, with
    ``β = max(1 − (t − start_step)/Q, 0)`` over optimizer steps t for the linear schedule.

    Args:
        method: the compression g, a registered name: ``"prune"`` (magnitude pruning), ``"binary"``
            (sign(W)·mean|W|), ``"lowrank"`` (truncated SVD factors B·A), or any registered plugin
            (:func:`hf_vcon.available_compressors`).
        options: the method's options, as its ``Options`` dataclass or a dict. The options may also be given as
            keyword arguments, ``VConConfig(method="prune", sparsity=0.9)``; read them back as ``config.options``
            (or ``config.sparsity``). Built-in options: prune ``sparsity``, ``prune_pattern``; binary
            ``binary_scale``; lowrank ``rank`` or ``rank_ratio``; quant ``bits``, ``strategy``, ``group_size``,
            ``format`` (int, fp8, nvfp4, mxfp4), ``activations`` (none, int8, fp8, fp8_static, nvfp4, mxfp4) or a
            compressed-tensors preset name as ``scheme`` (``VConConfig(method="quant", scheme="NVFP4")``).
        target_modules: which Linear/Conv1D modules get VCON, in PEFT's grammar: a list of module names, each
            matching a full name or a dotted suffix; a string, used as a regex ``re.fullmatch``-ed against the
            full module name; or ``"all-linear"`` (every Linear/Conv1D and fused expert weight of the base model;
            the task head and MoE routers stay dense: docs/guides/architectures.md).
        exclude_modules: modules to leave alone, in the same grammar (``"all-linear"`` excepted).
        module_overrides: per-module settings, like PEFT's ``rank_pattern``: a dict from a module-name pattern to
            a dict of options, and optionally another ``"method"``, e.g.
            ``{r".*attention.*": {"sparsity": 0.5}, r".*intermediate.*": {"method": "lowrank", "rank_ratio": 0.25}}``;
            an entry naming a ``scheme`` starts from quant's defaults (``{r".*mlp.*": {"scheme": "NVFP4A16"}}``).
            A pattern is a regex matched against the full module name or a dotted suffix of it; the first pattern
            that matches a targeted module wins (dict order). Without ``"method"`` the other options keep the base
            values; with another method they start from its defaults. A pattern that matches no targeted module
            is an error at :func:`hf_vcon.apply_vcon`.
        transition_steps: Q. An ``int`` is a number of optimizer steps; a ``float`` in (0, 1] is a fraction of the
            run's ``max_steps`` (resolved when training starts); ``0`` is the post-shot baseline (β = 0 at once).
        start_step: β stays 1 until this optimizer step, then the transition starts.
        schedule: the shape of β over the transition: ``"linear"`` (the paper), ``"cosine"`` or ``"cubic"``.
        transition: how the model goes from dense to compressed over Q. ``"vcon"`` (default) blends the two paths
            with β as above. ``"gmp"`` is the gradual magnitude pruning baseline of Zhu & Gupta (2017), for
            methods with a gradual option (prune, ``"layer"``/``"row"`` patterns): no blending (β = 0), a hard
            mask whose sparsity rises as ``s_t = s·(1 − (1 − p)³)``, p = (t − start_step)/Q clamped to [0, 1], and
            pruned weights get no gradient (with ``"vcon"`` and post-shot the latent W is trained
            straight-through, as the paper does); ``schedule`` does not apply.
        recompute_every: for compressions recomputed from W (prune, binary); recompute what C(W) needs besides W
            (the pruning cut, the scale) every this many optimizer steps. 1 (the default, as the paper) recomputes it
            once per optimizer step, never per micro-batch; k > 1 trades freshness for speed
            (``benchmarks/overhead.py`` shows the cost) and needs the step from :func:`hf_vcon.set_step`.
        granularity: what one VCON unit is: ``"layer"`` (default; every targeted Linear blends its weights) or
            ``"block"`` (each block of ``target_blocks`` blends its outputs ``β·f(x) + (1−β)·g(x)``, g a compressed
            copy of the block whose ``target_modules`` Linears are compressed; see :mod:`hf_vcon.layers.block`).
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
        >>> config = VConConfig(method="prune", sparsity=0.5, transition_steps=100)
        >>> config.options
        PruneOptions(sparsity=0.5, prune_pattern='layer')
        >>> config.sparsity
        0.5
    """

    method: str
    options: CompressorOptions
    target_modules: Targets
    exclude_modules: Targets
    module_overrides: Optional[dict[str, dict[str, Any]]]
    transition_steps: Union[int, float]
    start_step: int
    schedule: str
    transition: str
    recompute_every: int
    granularity: str
    target_blocks: Targets
    stagger: bool
    block_order: Optional[list[str]]

    def __init__(
        self,
        method: str = "prune",
        options: Union[CompressorOptions, dict[str, Any], None] = None,
        *,
        target_modules: Targets = ALL_LINEAR,
        exclude_modules: Targets = None,
        module_overrides: Optional[dict[str, dict[str, Any]]] = None,
        transition_steps: Union[int, float] = 0.2,
        start_step: int = 0,
        schedule: str = "linear",
        transition: str = "vcon",
        recompute_every: int = 1,
        granularity: str = "layer",
        target_blocks: Targets = None,
        stagger: bool = False,
        block_order: Optional[list[str]] = None,
        **method_options: Any,
    ) -> None:
        compressor_class(method)  # an unknown method is the first thing to say
        self.method = method
        self.options = self._checked_options(method, options, method_options)
        self.target_modules, self.exclude_modules = target_modules, exclude_modules
        self.module_overrides = module_overrides
        self.transition_steps, self.start_step, self.schedule = transition_steps, start_step, schedule
        self.transition, self.recompute_every = transition, recompute_every
        self.granularity, self.target_blocks, self.stagger, self.block_order = granularity, target_blocks, stagger, block_order
        self._check_targets()
        self._overrides = parse_overrides(module_overrides, self.setting)
        self._check_schedule()
        self._check_recompute_every()
        self._check_granularity()
        self._check_transition()

    # ----------------------------------------------------------------------------------------- options
    @staticmethod
    def _checked_options(method: str, options: Any, flat: dict[str, Any]) -> CompressorOptions:
        options_class = compressor_class(method).Options
        for name, value in flat.items():
            if name not in options_class.field_names():
                raise unexpected_option(name, value, method)
        if isinstance(options, options_class):
            return options.replace(**flat) if flat else options
        if isinstance(options, CompressorOptions):
            raise TypeError(f"options={options!r} are not method={method!r}'s ({options_class.__name__}).")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a {options_class.__name__} or a dict, not {type(options).__name__}.")
        return build_options(method, {**(options or {}), **flat})

    def __getattr__(self, name: str) -> Any:
        # config.sparsity reads the method's option (dataclass fields are found before this is called)
        if name.startswith("_") or name == "options" or "options" not in self.__dict__:
            raise AttributeError(name)
        options = self.__dict__["options"]
        if name in options.field_names():
            return getattr(options, name)
        owners = option_owners(name)
        hint = f" (an option of method={owners[0]!r})" if owners else ""
        raise AttributeError(f"VConConfig with method={self.method!r} has no {name!r}{hint}.")

    @property
    def setting(self) -> LayerSetting:
        """The base setting: ``method`` and ``options``."""
        return LayerSetting(self.method, self.options)

    @property
    def override_settings(self) -> tuple[tuple[str, LayerSetting], ...]:
        """``module_overrides`` as validated ``(pattern, setting)`` pairs, in order."""
        return self._overrides

    def setting_for(self, name: str) -> LayerSetting:
        """The setting of module ``name``: the first ``module_overrides`` pattern that matches it, else the base."""
        for pattern, setting in self._overrides:
            if matches_pattern(name, pattern):
                return setting
        return self.setting

    def settings(self) -> list[LayerSetting]:
        """Every distinct setting this config can give a module: the base one first, then the overrides'."""
        return list(dict.fromkeys([self.setting, *(setting for _, setting in self._overrides)]))

    # ----------------------------------------------------------------------------------------- validation
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
        if not is_number(q) or (isinstance(q, float) and not math.isfinite(q)):
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

    def _check_recompute_every(self) -> None:
        every = self.recompute_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"recompute_every={every!r} must be an int >= 1 (optimizer steps between mask/scale updates).")
        methods = [setting.method for setting in self.settings()]
        if every != 1 and not any(compressor_class(method).recomputes_from_weight for method in methods):
            raise ValueError(
                f"recompute_every={every} only applies to methods whose compressed weight is recomputed from W "
                f"(such as prune, binary), not method={self.method!r}; remove it."
            )

    def _check_granularity(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is not known; use one of: {', '.join(GRANULARITIES)}.")
        if not isinstance(self.stagger, bool):
            raise TypeError(f"stagger={self.stagger!r} must be True or False.")
        if self.granularity == "layer":
            for field in ("target_blocks", "block_order"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"{field}={getattr(self, field)!r} only applies to granularity='block', but "
                        f"granularity={self.granularity!r}; remove {field} or set granularity='block'."
                    )
            if self.stagger:
                raise ValueError(
                    f"stagger=True only applies to granularity='block', but granularity={self.granularity!r}; "
                    "set granularity='block' and target_blocks."
                )
            return
        self._check_blocks()

    def _check_blocks(self) -> None:
        if self.target_blocks is None:
            raise ValueError(
                "granularity='block' needs target_blocks: the blocks' module names (a list of names or dotted "
                "suffixes) or a regex such as r'bert\\.encoder\\.layer\\.\\d+'."
            )
        if self.target_blocks == ALL_LINEAR:
            raise ValueError("target_blocks='all-linear' is not a set of blocks; name the blocks or give a regex.")
        self.target_blocks = self._checked_targets("target_blocks", self.target_blocks)
        if self.block_order is None:
            return
        if not self.stagger:
            raise ValueError(f"block_order={self.block_order!r} only applies with stagger=True; set stagger=True or remove it.")
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
        gradual = [name for name in _methods() if compressor_class(name).gradual_option is not None]
        for setting in self.settings():
            if compressor_class(setting.method).gradual_option is None:
                raise ValueError(
                    f"transition='gmp' (gradual magnitude pruning) only applies to method='{'/'.join(gradual)}', but "
                    f"method={setting.method!r}; use transition='vcon' or method='{gradual[0] if gradual else 'prune'}'."
                )
            setting.compressor().check_gradual()
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
        """The configuration as a JSON-able dict, stamped with the format version and the hf_vcon version."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["options"] = self.options.to_dict()
        data["format_version"] = FORMAT_VERSION
        data["hf_vcon_version"] = __version__
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VConConfig":
        """Build a config from :meth:`to_dict`'s output, this version's or an earlier one's; unknown keys are
        ignored with a ``VConWarning``."""
        data = dict(data)
        written_by = data.pop("hf_vcon_version", "?")
        version = data.pop("format_version", 1)
        fields = set(cls.__dataclass_fields__)
        if version == 1 or "options" not in data:
            # Version 1 wrote every method's options as flat keys, None where they belonged to another method.
            option_names = {name for method in _methods() for name in compressor_class(method).Options.field_names()}
            data = {key: value for key, value in data.items() if key not in option_names or value is not None}
            flat = {key: data.pop(key) for key in list(data) if key in option_names}
        else:
            flat = {}
        unknown = sorted(set(data) - fields)
        if unknown:
            warnings.warn(f"Ignoring unknown VConConfig keys {unknown} (written by hf_vcon {written_by}, read by "
                          f"{__version__}).", VConWarning, stacklevel=2)
        return cls(**{key: value for key, value in data.items() if key in fields}, **flat)

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

