"""A periodic one-line status for a person watching the consumer in a terminal.

Printed to stderr every `STATUS_EVERY_S` when stderr is a TTY and logs are text (JSON logs are
for machines: no status lines among them). Each status is its own line, so log lines in between
never garble it:

    status  1,234 rows (12.5/s) | lag 56 | RTF 0.12 (8.3x realtime) | 2 in flight | 3 files | 1 dead letter
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TextIO

STATUS_EVERY_S = 10.0


@dataclass(frozen=True)
class StatusSnapshot:
    rows: int = 0
    dead_letters: int = 0
    files: int = 0
    lag: int | None = None  # summed over assigned partitions; None: not known yet
    rtf: float | None = None  # device seconds per audio second, whole run
    in_flight: int = 0


def format_status(s: StatusSnapshot, rows_per_second: float | None) -> str:
    parts = [f"{s.rows:,} rows" + (f" ({rows_per_second:.1f}/s)" if rows_per_second is not None else "")]
    parts.append(f"lag {s.lag:,}" if s.lag is not None else "lag ?")
    if s.rtf is not None:
        parts.append(f"RTF {s.rtf:.2f} ({1 / s.rtf:.1f}x realtime)" if s.rtf > 0 else "RTF 0")
    parts.append(f"{s.in_flight} in flight")
    parts.append(f"{s.files:,} file{'s' if s.files != 1 else ''}")
    if s.dead_letters:
        parts.append(f"{s.dead_letters:,} dead letter{'s' if s.dead_letters != 1 else ''}")
    return "status  " + " | ".join(parts)


class StatusLine:
    def __init__(self, stream: TextIO | Any, enabled: bool, every: float = STATUS_EVERY_S) -> None:
        self.stream = stream
        self.enabled = enabled
        self.every = every
        self._last_at: float | None = None
        self._last_rows = 0

    def tick(self, snapshot: StatusSnapshot, now: float | None = None) -> bool:
        """Print if a period has passed since the last line; returns whether it printed."""
        if not self.enabled:
            return False
        now = time.monotonic() if now is None else now
        if self._last_at is None:  # the first tick starts the clock: a rate needs two points
            self._last_at, self._last_rows = now, snapshot.rows
            return False
        elapsed = now - self._last_at
        if elapsed < self.every:
            return False
        rate = (snapshot.rows - self._last_rows) / elapsed if elapsed > 0 else None
        self._last_at, self._last_rows = now, snapshot.rows
        try:
            self.stream.write(format_status(snapshot, rate) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: stop trying
            self.enabled = False
            return False
        return True
