"""One fine-tuning run: a frozen `RunConfig` in, an honest record out."""
from core.config import RunConfig
from core.errors import UsageError
from core.record import RunRecord
from core.session import Session
from core.train import check, run

__all__ = ["RunConfig", "RunRecord", "Session", "UsageError", "check", "run"]
