"""Typed errors. Each message says what is wrong and where, so a person can fix it."""


class ShipperError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(ShipperError):
    """The configuration is invalid. Carries every problem found, each naming its key, and the file
    they were found in (``source``: a path, or "<embedded default>")."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))


class DeliveryError(ShipperError):
    """An output could not deliver a batch."""


class RetryableError(DeliveryError):
    """Temporary: the same batch may succeed later (network down, throttled, 5xx)."""


class BufferFull(RetryableError):
    """Not a failure: the output holds as much as it may while its destination keeps up;
    the runner waits briefly (readers wait behind it) without logging or counting a retry."""


class FatalError(DeliveryError):
    """Permanent: retrying these batches cannot succeed. Their records are counted as dropped
    under ``reason`` (e.g. "too_old") and confirmed, so they do not hold checkpoints back."""

    def __init__(self, message: str, batches: list | tuple = (), reason: str = "rejected"):
        super().__init__(message)
        self.batches = list(batches)
        self.reason = reason
