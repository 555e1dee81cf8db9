"""One fine-tuning run: a frozen `RunConfig` in, an honest record out."""
from core.config import RunConfig
from core.errors import UsageError
from core.record import RunRecord

__all__ = ["RunConfig", "RunRecord", "Session", "UsageError", "check", "run"]


def __getattr__(name: str):
    # `check`, `run` and `Session` load torch and transformers: only when asked for, so that `core.errors` and
    # `core.cli` (and every command's --help) import without them.
    import importlib
    if name == "check":
        return importlib.import_module("core.prepare").check
    if name == "run":
        return importlib.import_module("core.train").run
    if name == "Session":
        return importlib.import_module("core.session").Session
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
