"""Loads the native extension fourm_fast._C defensively.

Importing fourm_fast never fails because of the extension; using an op without it raises an
ImportError that says what is missing and how to build it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None


def _load() -> None:
    global _module, _error
    if _module is not None or _error is not None:
        return
    try:
        import torch  # noqa: F401  (libtorch must be loaded before _C)

        _module = importlib.import_module("fourm_fast._C")
    except ImportError as exc:  # not built, or built against another torch
        _error = f"{type(exc).__name__}: {exc}"


def extension() -> ModuleType:
    """The loaded _C module; raises ImportError with the reason when it is unavailable."""
    _load()
    if _module is None:
        raise ImportError(
            "fourm_fast's native extension (fourm_fast._C) could not be loaded: "
            f"{_error}. Build it with `pip install --no-build-isolation -e .` (or `make build`) "
            "using the same torch that is installed now."
        )
    return _module


def load_error() -> str | None:
    """Why the extension failed to load, or None when it loaded."""
    _load()
    return _error
