"""Every failure the pipeline names, as one tree.

    PipelineError                      (root; `retriable` says whether trying again can help)
    ├── Superseded                     not a failure: the object was overwritten before its event was
    │                                  read (412 on GetObject IfMatch); that version's own event makes its row
    ├── PermanentError                 the input is bad: dead-letter it, never retry
    │   ├── MalformedEvent             message is not JSON or lacks required fields
    │   ├── ObjectMissing              NoSuchKey: the object is gone
    │   ├── EmptyObject                zero bytes
    │   ├── ObjectTooLarge             over the configured download limit
    │   ├── NotAudio                   libsndfile cannot read it (also corrupt audio)
    │   ├── DurationOutOfRange         shorter than min or longer than max duration
    │   ├── TranscriptionFailed        Whisper failed on this one file
    │   ├── TokenizationFailed         the tokenizer failed on this one file
    │   └── CrashLoop                  the process died with it in flight max_attempts times in a row
    ├── TransientError                 the world is briefly unwell: retry with backoff
    │   └── StorageUnavailable         S3 timeouts, 5xx, throttling, connection refused
    └── FatalError                     the process cannot go on safely: stop without committing
        ├── OutputWriteFailed          a Parquet write/fsync/rename failed (disk full, read-only)
        ├── DeadLetterFailed           the DLQ could not be written: the offset must not commit
        ├── Fenced                     another consumer finalized these offsets first (this one lost
        │                              its partitions, e.g. paused past the session timeout)
        ├── ModelUnavailable           weights cannot be found or loaded (fails at start-up)
        └── OutputConfigMismatch       the output directory was built with other settings

`error_type` in a dead-letter record is the class name of a `PermanentError`.
"""

from __future__ import annotations


class PipelineError(Exception):
    retriable: bool = False

    @property
    def error_type(self) -> str:
        return type(self).__name__


class Superseded(PipelineError):
    """The event's object version is no longer the stored one: no row, no dead letter (counted)."""


class PermanentError(PipelineError):
    """Bad input: dead-lettered with its reason; the stream goes on."""


class MalformedEvent(PermanentError):
    pass


class ObjectMissing(PermanentError):
    pass


class EmptyObject(PermanentError):
    pass


class ObjectTooLarge(PermanentError):
    pass


class NotAudio(PermanentError):
    pass


class DurationOutOfRange(PermanentError):
    pass


class TranscriptionFailed(PermanentError):
    pass


class TokenizationFailed(PermanentError):
    pass


class CrashLoop(PermanentError):
    """The record killed the process (OOM kill, native crash) max_attempts times in a row, the
    last ones alone: dead-lettered without processing it again (consumer/crash_guard.py)."""


class TransientError(PipelineError):
    retriable = True


class StorageUnavailable(TransientError):
    pass


class FatalError(PipelineError):
    """The consumer must stop without committing; a restart resumes safely."""


class OutputWriteFailed(FatalError):
    pass


class DeadLetterFailed(FatalError):
    pass


class Fenced(FatalError):
    pass


class ModelUnavailable(FatalError):
    pass


class OutputConfigMismatch(FatalError):
    pass
