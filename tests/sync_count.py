"""Counting the operations that make the host wait for the device, on CPU.

On a GPU the host enqueues kernels ahead of the device; reading a device value into Python (``.item()``, ``bool(t)``,
``torch.equal``) or running an operation whose output shape depends on the data (``nonzero``, a boolean-mask
gather) stalls that queue until the device catches up. Those operations are the same on every device, so a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees every ATen call counts them on CPU.

hf_vcon reads values back on purpose where that is free, on a CPU (:func:`hf_vcon.compressors.selection.host_reads_are_free`:
pruning's cut searched near the previous one); :func:`as_on_an_accelerator` turns that off, so that the CPU runs, and
the counter sees, what an accelerator runs.
"""

from __future__ import annotations

import contextlib
import importlib
import traceback
from collections import Counter
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that read device data into the host, or whose output size depends on device data.
ALWAYS_SYNC = ("_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select")
# Index operations that synchronise only with a boolean (or uint8 mask) index.
MASK_INDEXED = ("index", "index_put", "index_put_", "_index_put_impl_")


def _is_mask(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.uint8)


def sync_reason(func, args, kwargs) -> str | None:
    """The name under which ``func`` called with ``args`` synchronises, or ``None`` if it does not."""
    name = func.overloadpacket.__name__
    if name in ALWAYS_SYNC or name.startswith(("unique", "_unique")):
        return name
    if name in MASK_INDEXED and len(args) > 1 and any(_is_mask(index) for index in (args[1] or ())):
        return f"{name} (boolean index)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) \
            and (len(args) < 2 or isinstance(args[1], torch.Tensor) or func._overloadname == "Tensor"):
        return "repeat_interleave (no output_size)"
    return None


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as counter: …``: ``counter.counts`` tallies the synchronising operations by name;
    ``counter.sites`` names the innermost hf_vcon frame that made each (for failure messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.sites: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            self.counts[reason] += 1
            self.sites[f"{reason} at {_vcon_frame()}"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _vcon_frame() -> str:
    frames = [frame for frame in traceback.extract_stack() if "hf_vcon" in frame.filename]
    if not frames:
        return "outside hf_vcon"
    frame = frames[-1]
    return f"{frame.filename.rsplit('hf_vcon', 1)[-1]}:{frame.lineno} ({frame.name})"


def count_syncs(function) -> SyncCounter:
    """Run ``function()`` under a :class:`SyncCounter` and return it."""
    with SyncCounter() as counter:
        function()
    return counter


# Where hf_vcon decides that reading values back is free (a CPU); the module that imported the name is patched too.
_HOST_READ_GATES = ("hf_vcon.compressors.selection.host_reads_are_free", "hf_vcon.compressors.prune.host_reads_are_free")


@contextlib.contextmanager
def as_on_an_accelerator():
    """Within it, hf_vcon takes the code paths it takes on an accelerator, on a CPU too (a version without such gates
    is left as it is)."""
    with contextlib.ExitStack() as stack:
        for target in _HOST_READ_GATES:
            module_name, name = target.rsplit(".", 1)
            if hasattr(importlib.import_module(module_name), name):
                stack.enter_context(mock.patch(target, lambda device: False))
        yield
