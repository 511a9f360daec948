"""Small text helpers every dashboard panel shares: the dash for "not measured", durations, and
fitting a line to a width."""

from __future__ import annotations

from rich.text import Text

NONE = "–"


def fmt_duration(s: float | None) -> str:
    """`42s`, `12m05s`, `3h07m`; `None` renders as a dash."""
    if s is None or s != s or s < 0:
        return NONE
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fit(text: Text, width: int) -> Text:
    """One line, cut with an ellipsis at ``width`` cells."""
    text.no_wrap = True
    text.truncate(max(width, 1), overflow="ellipsis")
    return text


def elide(s: str, width: int) -> str:
    """``s`` in at most ``width`` characters, its end replaced by an ellipsis when cut."""
    return s if len(s) <= width else s[: max(width - 1, 0)] + "…"
