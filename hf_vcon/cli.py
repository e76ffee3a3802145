"""``python -m hf_vcon``: the command line.

    python -m hf_vcon export out/checkpoint-500 out/merged     # a training checkpoint → the merged model

Errors a user can fix (a folder that is not a VCON checkpoint, a model already in the output folder) print one line
naming the problem and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from .errors import IncompatibleCheckpointError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_vcon", description="hf_vcon command line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    export = commands.add_parser(
        "export",
        help="Write the merged compressed model of a training checkpoint (checkpoint-N) to a folder.",
        description="Write the merged compressed model (plain from_pretrained loads it, without hf_vcon) of a VCON "
                    "training checkpoint: a checkpoint-N folder of a VConTrainer / VConCallback run, or any folder "
                    "with a patched model's weights, its config.json and vcon_config.json.",
    )
    export.add_argument("checkpoint", help="the checkpoint folder, such as out/checkpoint-500")
    export.add_argument("output_dir", help="where the merged model goes")
    export.add_argument("--overwrite", action="store_true", help="replace a model already in output_dir")
    return parser


def _export(args: argparse.Namespace) -> None:
    from .export.from_checkpoint import export_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = export_checkpoint(args.checkpoint, args.output_dir, overwrite=args.overwrite)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(f"Wrote the merged compressed model of {args.checkpoint} to {args.output_dir}\n{summary.table()}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit code (0, or 2 for an error the user can fix)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _export(args)
    except (IncompatibleCheckpointError, OSError, ValueError) as error:  # OSError: no such folder, a model there
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    return 0
