"""Exceptions with messages that name the key, file or line at fault."""

from __future__ import annotations


class TSPOError(Exception):
    """Base class: every error the library raises on bad input or state."""


class ConfigError(TSPOError, ValueError):
    """Invalid `params.yaml` (or override): the message names the file and the dotted key."""


class DataError(TSPOError, ValueError):
    """Malformed data file. `path` and (1-based) `line` locate the problem when known."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path, self.line, self.reason = path, line, message
        where = path if path is not None else "<data>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")
