"""Errors raised on bad user input.

Every message names the offending value, where it came from (file, key, column)
and what to do about it; callers never need a traceback to fix their input.
"""


class CxrtuneError(ValueError):
    """Base class for errors caused by user input (config, data, arguments)."""


class ConfigError(CxrtuneError):
    """A config or search-space value is invalid."""


class DataError(CxrtuneError):
    """A dataset folder, manifest or image file is unusable."""


class SearchFailed(RuntimeError):
    """Every trial of a search failed; the message holds the first trial's own error."""


class SearchInterrupted(RuntimeError):
    """A search stopped (Ctrl-C) before its trials finished; it can be resumed."""
