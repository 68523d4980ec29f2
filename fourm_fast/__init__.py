"""fourm_fast: fast, tested operators and training for 4M-style multimodal masked modeling."""
from .version import __version__
from ._extension import load_error as _load_error
from .info import info

# Registers torch.ops.fourm_fast.* and their fake/autograd rules when the extension is present.
if _load_error() is None:
    from . import ops  # noqa: F401

__all__ = ["__version__", "info"]
