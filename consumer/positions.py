"""Where a partition resumes after an assignment: pure functions, so the rule can be tested alone.

Two sources say how far a partition has been handled: the group's committed offset (the
broker) and the finalized files' footers (`OutputLedger.next_offset`). A crash between a
file's rename and its commit leaves the broker behind the files; the files are the proof, so
a partition resumes at the later of the two and never re-processes what a file already holds.
"""

from __future__ import annotations


def resume_offset(committed: int | None, from_files: int | None, rewind: int | None = None) -> int | None:
    """The first offset to fetch, or None when neither source knows (auto_offset_reset decides).

    `rewind` (--from-beginning / --from-timestamp, first assignment only) replaces the committed
    offset; even a rewind never goes back before what the output files hold.
    """
    start = rewind if rewind is not None else committed
    known = [o for o in (start, from_files) if o is not None]
    return max(known) if known else None


def lagging_commit(committed: int | None, from_files: int | None) -> int | None:
    """The offset to commit when the files are ahead of the broker (a crash before the commit), else None.

    Committing it costs nothing (the files prove those events are handled) and keeps the group's
    lag honest for monitoring and for a consumer that reads the topic without the files.
    """
    if from_files is not None and (committed is None or committed < from_files):
        return from_files
    return None
