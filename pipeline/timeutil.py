"""ISO-8601 times as every command and parser reads them: one function, one set of rules."""

from __future__ import annotations

from datetime import datetime, timezone


def parse_iso_time(text: str) -> datetime:
    """An aware UTC time from ISO 8601: `2024-05-01`, `2024-05-01T12:00:00Z`, `...+02:00`.

    A time without a zone is UTC; a trailing `z` counts as `Z`. Raises ValueError (its message
    says what was wrong, not the text: callers name the setting and the value).
    """
    s = text.strip()
    if s[-1:] in ("Z", "z"):
        s = s[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError("not ISO-8601 (e.g. 2024-05-01 or 2024-05-01T12:00:00Z)") from None
    if t.tzinfo is None:
        return t.replace(tzinfo=timezone.utc)
    try:
        return t.astimezone(timezone.utc)
    except (OverflowError, ValueError):  # year 9999 at -05:00 is past datetime.max in UTC
        raise ValueError("out of range") from None
