"""The ``--vcon_*`` flags and argument parsing with clear errors (a message naming the flag, exit code 2).

The flags of the compressions' options are generated from the registry: every option of every registered
compression becomes ``--vcon_<option>`` with its own help text, so a new compression reaches the scripts with no
edit here. Compressions from installed packages (``hf_vcon.compressors`` entry points) are included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from transformers import HfArgumentParser, TrainingArguments

from hf_vcon import VConConfig, available_compressors
from hf_vcon.compressors import compressor_class
from hf_vcon.export.merged import AUTO, EXPORT_FORMATS

NONE_METHOD = "none"
_REGEX_CHARS = re.compile(r"[*+?\[\](){}|^$\\]")


class UsageError(Exception):
    """Bad input found before training: the message names the flag; the script exits with code 2."""


def run_main(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> Any:
    """Call ``main(argv)``; a :class:`UsageError` becomes ``<script>: error: <message>`` on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _modules_arg(values: Optional[list[str]]) -> Any:
    """CLI values → VConConfig's target grammar: one regex-looking value is a regex, "all-linear" stays, else a list."""
    if not values:
        return None
    if len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS.search(values[0])):
        return values[0]
    return list(values)


def _transition_steps(text: str) -> Any:
    """"100" → 100 optimizer steps, "0.2" → a fraction of the run, "0" → 0 (post-shot)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"argument --vcon_transition_steps: {text!r} is not a number; give an int (optimizer steps), a float "
            "in (0, 1] (a fraction of the run) or 0 (post-shot)."
        ) from None


def _module_overrides(text: Optional[str]) -> Optional[dict]:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"argument --vcon_module_overrides: {text!r} is not JSON ({error}); give an object such as "
            '\'{".*attention.*": {"sparsity": 0.5}, ".*intermediate.*": {"method": "lowrank", "rank_ratio": 0.25}}\'.'
        ) from None


@dataclass
class VConCommonArguments:
    """The flags of VConConfig's common fields; :data:`VConArguments` adds one per compression option."""

    vcon_method: str = field(
        default="prune",
        metadata={"help": f"The compression: {', '.join(available_compressors())}; or {NONE_METHOD} for a dense "
                          "fine-tune (the reference)."},
    )
    vcon_transition_steps: str = field(
        default="0.2",
        metadata={"help": "Q, over which β goes 1 → 0: an int is optimizer steps, a float in (0, 1] a fraction of the "
                          "run, 0 the post-shot baseline (compress at once)."},
    )
    vcon_start_step: int = field(default=0, metadata={"help": "β stays 1 until this optimizer step."})
    vcon_schedule: str = field(default="linear", metadata={"help": "β's shape: linear (the paper), cosine or cubic."})
    vcon_target_modules: Optional[list[str]] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules to compress: names or dotted suffixes (query value), one regex re.fullmatch-ed "
                          "against full module names, or all-linear (every Linear except the head; the default)."},
    )
    vcon_exclude_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules to leave dense, in the same grammar."}
    )
    vcon_module_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "Per-module settings as JSON: a pattern (a regex matched against a module's full name or a "
                          "dotted suffix; the first match wins) → options, and optionally another method, e.g. "
                          '\'{".*attention.*": {"sparsity": 0.5}}\'.'},
    )
    vcon_export_format: str = field(
        default=AUTO,
        metadata={"help": "The saved model's format: auto (compressed-tensors for quantized models, quant and binary, "
                          "when the model allows it and the package is installed; else dense), dense (float weights, "
                          "any transformers loads it) or compressed-tensors (packed integers: transformers with the "
                          "compressed-tensors package and vLLM load it).",
                  "choices": list(EXPORT_FORMATS)},
    )
    vcon_compare: bool = field(
        default=False,
        metadata={"help": "Run the three arms: a dense fine-tune, then post-shot (Q = 0) and VCON each from the dense "
                          "fine-tuned model, and print their table. The VCON model is the one saved in --output_dir."},
    )

    def option_values(self) -> dict[str, Any]:
        """The compression options given on the command line (``--vcon_<option>``), by option name."""
        common = {f.name for f in dataclasses.fields(VConCommonArguments)} | _distill_field_names()
        return {f.name[len("vcon_"):]: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in common and getattr(self, f.name) is not None}

    def to_vcon_config(self) -> Optional[VConConfig]:
        """The :class:`VConConfig` of these flags (``None`` for ``--vcon_method none``).

        Raises:
            UsageError: naming the ``--vcon_…`` flag(s), with VConConfig's own explanation.
        """
        options = self.option_values()
        if self.vcon_method == NONE_METHOD:
            given = [f"--vcon_{name}" for name in options] + (["--vcon_module_overrides"] if self.vcon_module_overrides else [])
            given += ["--vcon_export_format"] if self.vcon_export_format != AUTO else []
            if given:
                raise UsageError(f"argument {given[0]}: it does not apply to --vcon_method none (a dense fine-tune).")
            return None
        fields = dict(method=self.vcon_method, transition_steps=_transition_steps(self.vcon_transition_steps),
                      start_step=self.vcon_start_step, schedule=self.vcon_schedule,
                      target_modules=_modules_arg(self.vcon_target_modules),
                      exclude_modules=_modules_arg(self.vcon_exclude_modules),
                      module_overrides=_module_overrides(self.vcon_module_overrides))
        try:
            return VConConfig(**fields, **options)
        except (TypeError, ValueError) as error:
            flag = flags_named(str(error), [*fields, *options])
            raise UsageError(f"argument {flag}: {_with_none(str(error))}") from None


    def flag_for(self, message: str) -> str:
        """The ``--vcon_…`` flag(s) a library message (a layer that cannot take its compression…) is about."""
        common = [f.name[len("vcon_"):] for f in dataclasses.fields(VConCommonArguments)]
        distill = {name[len("vcon_"):] for name in _distill_field_names()}
        options = [f.name[len("vcon_"):] for f in dataclasses.fields(self)
                   if f.name[len("vcon_"):] not in common and f.name[len("vcon_"):] not in distill]
        return flags_named(message, [*common, *options]).split("/")[0]


def flags_named(message: str, names: list[str]) -> str:
    """The ``--vcon_…`` flags whose fields (of ``names``) a VConConfig message names, in the order it names them."""
    if message.startswith("module_overrides"):
        return "--vcon_module_overrides"
    named = [name for name in names if re.search(rf"(?<![\w-]){name}(?!\w)", message)]
    return "/".join(f"--vcon_{name}" for name in sorted(named, key=message.find)) or "--vcon_method"


def _with_none(message: str) -> str:
    if "method=" in message and "is not known" in message:
        return message.rstrip(".") + f", or {NONE_METHOD} (a dense fine-tune)."
    return message


def _option_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` of ``--vcon_<option>`` for every option of every registered compression (an option
    several compressions share becomes one flag, its help naming each)."""
    helps: dict[str, list[str]] = {}
    types: dict[str, Any] = {}
    for method in available_compressors():
        options = compressor_class(method).Options
        for name, help_text in options.field_help().items():
            helps.setdefault(name, []).append(f"{method}: {help_text}")
            types.setdefault(name, options.field_types()[name])
    return [(f"vcon_{name}", Optional[types[name]], field(default=None, metadata={"help": "; ".join(helps[name]) + "."}))
            for name in helps]


def _distill_field_names() -> set[str]:
    from .distill_flags import distill_field_names  # it imports UsageError from here

    return distill_field_names()


def _bases() -> tuple[type, ...]:
    from .distill_flags import VConDistillArguments

    return (VConDistillArguments, VConCommonArguments)  # fields in this order: common, distillation, options


VConArguments = dataclasses.make_dataclass("VConArguments", _option_fields(), bases=_bases())
VConArguments.__doc__ = ("Every ``--vcon_*`` flag; each maps to the VConConfig field (or option) of the same name, "
                         "and the ``--vcon_distill_*`` / ``--vcon_teacher_*`` flags to a DistillationConfig.")
VConArguments.__module__ = __name__


@dataclass
class OverwriteArguments:
    """``--overwrite_output_dir``, which transformers 5 removed from ``TrainingArguments``."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a model already saved in --output_dir (never replaced otherwise)."}
    )


def _has_overwrite_flag() -> bool:
    return "overwrite_output_dir" in {f.name for f in dataclasses.fields(TrainingArguments)}


def _given_flags(argv: list[str], json_values: Optional[dict]) -> frozenset[str]:
    """The flags the command line (or its JSON file) sets, by field name."""
    if json_values is not None:
        return frozenset(json_values)
    return frozenset(arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--"))


def parse_args(dataclass_types: Sequence[type], argv: Optional[Sequence[str]] = None) -> tuple:
    """Parse ``argv`` (default ``sys.argv[1:]``; one ``.json`` path reads the flags from that file) into the dataclasses.

    Returns their instances in order, then ``overwrite_output_dir`` (a bool), then the names of the flags given
    (a frozenset: ``{"save_strategy", …}``) last. Without ``--do_train``, ``--do_eval`` or ``--do_predict`` the run
    trains and evaluates (the transformers scripts need both flags).
    """
    types = list(dataclass_types)
    if not _has_overwrite_flag():
        types.append(OverwriteArguments)
    parser = HfArgumentParser(types, allow_abbrev=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    json_values = None
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(os.path.abspath(argv[0]), encoding="utf-8") as handle:
            json_values = json.load(handle)
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    parsed = list(parsed)
    overwrite = parsed.pop().overwrite_output_dir if not _has_overwrite_flag() else None
    training_args = next(item for item in parsed if isinstance(item, TrainingArguments))
    if overwrite is None:
        overwrite = training_args.overwrite_output_dir
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True
    return (*parsed, overwrite, _given_flags(argv, json_values))
