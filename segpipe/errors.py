"""Errors shared across segpipe's layers (no third-party imports)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """An option (config, command line or constructor argument) has a value segpipe cannot use.

    The message names the option, what it accepts and what was given. ``segpipe fit|validate|test``
    print it as one ``segpipe: error: ...`` line instead of a traceback. A subclass of
    :class:`ValueError`, so callers in Python that catch that keep working.
    """
