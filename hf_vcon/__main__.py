"""``python -m hf_vcon …``: see :mod:`hf_vcon.cli`."""

import sys

from .cli import main

sys.exit(main())
