"""Single values written as TOML text (for the manifest writer and for error messages), and
``"HOST:PORT"`` read back.

Kept apart from the manifest modules so the section constraints, the loader and the writer quote
values one way without importing each other.
"""

from __future__ import annotations

import re
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

# TOML basic strings: escape quote, backslash and every control character (TOML 1.0, "String").
_ESCAPES = {i: f"\\u{i:04X}" for i in [*range(0x20), 0x7F]}
_ESCAPES.update({ord(c): "\\" + e for c, e in zip('"\\\b\t\n\f\r', '"\\btnfr')})


def toml_str(s: str) -> str:
    """``s`` as a TOML basic string, quotes included."""
    return '"' + s.translate(_ESCAPES) + '"'


def toml_value(v: Any) -> str:
    """``v`` written as a TOML value (inline for arrays and tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, str)):
        return toml_str(v) if isinstance(v, str) else str(v)
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float; inf/nan are TOML too
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = (f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items())
        return "{" + ", ".join(items) + "}"
    return v.isoformat() if hasattr(v, "isoformat") else str(v)  # TOML dates and times


def toml_key(k: str) -> str:
    """``k`` as a TOML key: bare when TOML allows it, else quoted."""
    return k if _BARE_KEY.fullmatch(k) else toml_str(k)


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) into host and port; ValueError if bad."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or "[" in host or "]" in host:
        raise ValueError(f'must be "HOST:PORT", got {toml_value(listen)}')
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"port must be an integer in 0..65535, got {toml_value(port)}")
    return host, int(port)
