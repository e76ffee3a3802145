"""What the example scripts share: the ``--vcon_*`` flags (:mod:`.flags`), what is checked before any data is
tokenized or any arm trains (:mod:`.checks`), metrics with an offline fallback (:mod:`.metrics`) and the run itself
(:mod:`.runner`).

The scripts put ``examples/`` on ``sys.path`` so that ``python examples/<task>/<script>.py`` runs from a clone.
"""

from .flags import NONE_METHOD, UsageError, VConArguments, VConCommonArguments, parse_args, run_main
from .checks import check_cells, check_checkpoint_fits, check_flags, check_hub, check_output_dir, check_vcon_fits
from .metrics import load_metric
from .runner import Task, compare, load_or_fail, make_trainer, run, setup_logging

__all__ = [
    "NONE_METHOD",
    "Task",
    "UsageError",
    "VConArguments",
    "VConCommonArguments",
    "check_cells",
    "check_checkpoint_fits",
    "check_flags",
    "check_hub",
    "check_output_dir",
    "check_vcon_fits",
    "compare",
    "load_metric",
    "load_or_fail",
    "make_trainer",
    "parse_args",
    "run",
    "run_main",
    "setup_logging",
]
