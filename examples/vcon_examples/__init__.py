"""What the example scripts share: the ``--vcon_*`` flags (:mod:`.flags`), metrics with an offline fallback
(:mod:`.metrics`) and the run itself (:mod:`.runner`).

The scripts put ``examples/`` on ``sys.path`` so that ``python examples/<task>/<script>.py`` runs from a clone.
"""

from .flags import NONE_METHOD, UsageError, VConArguments, VConCommonArguments, parse_args, run_main
from .metrics import load_metric
from .runner import Task, check_output_dir, compare, load_or_fail, make_trainer, run

__all__ = [
    "NONE_METHOD",
    "Task",
    "UsageError",
    "VConArguments",
    "VConCommonArguments",
    "check_output_dir",
    "compare",
    "load_metric",
    "load_or_fail",
    "make_trainer",
    "parse_args",
    "run",
    "run_main",
]
