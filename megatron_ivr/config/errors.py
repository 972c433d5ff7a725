"""The one error type of configuration problems; its message always names the key."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range.

    ``key`` is the dotted key at fault when one is known.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
