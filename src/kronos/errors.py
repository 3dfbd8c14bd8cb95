"""One exception family for every error a user can cause.

The CLI prints these as one line and exits non-zero; library users can catch :class:`KronosError`.
"""

from __future__ import annotations


class KronosError(Exception):
    """Base class: an actionable problem with the user's input, config, data or checkpoints."""


class ConfigError(KronosError, ValueError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(KronosError, ValueError):
    """Market data is missing, unreadable or malformed."""


class CheckpointError(KronosError, OSError):
    """A checkpoint cannot be found, read or matched to the model."""


class InputError(KronosError, ValueError):
    """Bad arguments to a public API call (predict, generate, ...)."""


class DependencyError(KronosError, ImportError):
    """An optional dependency (e.g. pyqlib) is needed but not installed."""


class TrainingError(KronosError, RuntimeError):
    """Training cannot go on (e.g. the loss or gradients stayed non-finite for too many steps in a row)."""


class BusyError(KronosError, RuntimeError):
    """Another run holds the output folders (run lock), or the lock cannot be taken."""


def cuda_missing_hint() -> str:
    """Why CUDA is unavailable and what to install: the end of every 'CUDA asked, not available' message."""
    import torch

    if torch.version.cuda is None:
        return (
            f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build (pip install "
            "torch==<version> --index-url <the URL pytorch.org's selector gives for your CUDA>, see README "
            "Install) or use device 'cpu'"
        )
    return (
        f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; check the driver with "
        "`nvidia-smi` and CUDA_VISIBLE_DEVICES, or use device 'cpu'"
    )
