"""Named crash points for fault-injection tests: `METAVOICE_CRASH_AT=name[:n]` kills the process
with SIGKILL the n-th time (default first) execution reaches `crash_point(name)`.

Unset (always, in production) it costs one dict lookup. It exists because "kill -9 after the
rename but before the commit" cannot be hit reliably from outside the process.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("METAVOICE_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
