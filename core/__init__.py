"""One fine-tuning run: a frozen `RunConfig` in, an honest record out."""
from core.config import RunConfig
from core.errors import UsageError
from core.train import check, run

__all__ = ["RunConfig", "UsageError", "check", "run"]
