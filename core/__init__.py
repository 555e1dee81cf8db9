"""One fine-tuning run: a frozen `RunConfig` in, an honest record out."""
from core.config import RunConfig
from core.errors import UsageError

__all__ = ["RunConfig", "UsageError", "check", "run"]


def __getattr__(name: str):
    # `check` and `run` load torch and transformers: only when asked for, so that `core.errors` and `core.cli`
    # (and every command's --help) import without them.
    if name in ("check", "run"):
        import importlib
        return getattr(importlib.import_module("core.train"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
