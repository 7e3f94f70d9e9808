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


MAX_RENDERED_CHARS = 200
"""Longest rendering of an offending value in an error message (`bounded_repr`, `cut`)."""


def cut(text: str, limit: int = MAX_RENDERED_CHARS) -> str:
    """`text` cut to at most `limit` characters (`...` marks a cut)."""
    return text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def bounded_repr(value: object, limit: int = MAX_RENDERED_CHARS) -> str:
    """`repr(value)` for an error message, at most `limit` characters, abbreviated *before* it is rendered: long
    strings, big or deeply nested containers (or one container repeated through YAML aliases) cost at most a few
    hundred elements, never the whole value. A value whose repr fails (an integer of more than 4,300 digits) is
    named by its type."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxfrozenset, r.maxdeque, r.maxarray = 3, *[6] * 7
    r.maxstring = r.maxother = r.maxlong = limit
    try:
        text = r.repr(value)
    except Exception:  # noqa: BLE001 - a message must never fail while naming the value
        text = f"<{type(value).__name__}>"
    return cut(text, limit)
