"""The one exception type a user sees as a one-line message instead of a traceback."""


class UsageError(ValueError):
    """Bad input: a value the run cannot use. The message is one sentence naming the value and what is allowed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a batch scheduler's cancel, `docker stop`) raised where the process is, so it ends
    as Ctrl-C does: a claimed run recorded as interrupted (rerun at once, not after its heartbeats go stale), no
    record half-written, one line."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception as a short phrase for a one-line message: its first line, or its type if it has no text."""
    text = str(error)
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(" ,;:(") + " …"  # cut at a word, and said to be cut: not a sentence that ends mid-way


def failure_reason(error: BaseException) -> str:
    """Why a run failed, as stored with a FAIL trial: the exception's type and first line."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:500]
