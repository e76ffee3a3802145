"""The error and warning vocabulary of hf_vcon.

Every user-facing check raises one of these (never ``assert``), so checks survive ``python -O`` and callers
can catch hf_vcon problems without catching unrelated errors.
"""


class VConError(Exception):
    """Base class of every error hf_vcon raises on purpose."""


class NoTargetModulesError(VConError, ValueError):
    """``target_modules`` matched no Linear/Conv1D module of the model."""


class UnsupportedLayerError(VConError, ValueError):
    """A layer's shape cannot take a compression at all (an N:M pattern that does not divide its inputs, a layer too
    small to factorise): ``"all-linear"`` leaves such a layer dense, with a warning; a layer named explicitly raises."""


class IncompatibleCheckpointError(VConError, ValueError):
    """A checkpoint's VCON tensors or files do not match the configuration they are loaded with."""


class VConWarning(UserWarning):
    """Warnings from hf_vcon; filter them with ``warnings.filterwarnings("ignore", category=VConWarning)``."""
