"""The one exception type a user sees as a one-line message instead of a traceback."""


class UsageError(ValueError):
    """Bad input: a value the run cannot use. The message is one sentence naming the value and what is allowed."""
