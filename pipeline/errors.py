"""Every failure the pipeline names, as one tree.

    PipelineError                      (root)
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
    │   ├── AnalysisFailed             VAD, a quality scorer or the speaker encoder failed on this one file
    │   ├── CrashLoop                  the process died with it in flight max_attempts times in a row
    │   ├── BucketNotAllowed           the event names a bucket outside METAVOICE_ALLOWED_BUCKETS
    │   ├── InvalidRequest             S3 cannot even be asked (an invalid bucket name): botocore refuses
    │   ├── ObjectRejected             S3 refused the request for this object (an unlisted 4xx code)
    │   ├── ObjectUnavailable          this object's 5xx persisted past its retries while its bucket answers
    │   ├── ObjectForbidden            AccessDenied for this object while the same credentials read its
    │   │                              bucket (a deny on a key or prefix, a KMS key the role cannot use)
    │   ├── VersionMismatch            the event's etag is no version of its object, and the object was
    │   │                              not overwritten after the event (a producer that filled in another etag)
    │   └── DownloadFailed             anything else that broke reading this one object
    ├── TransientError                 the world is briefly unwell: retry with backoff
    │   ├── StorageUnavailable         S3 timeouts, 5xx, throttling, connection refused
    │   └── EnvironmentFault           not about any object: the batch stops (no dead letter, no commit),
    │       │                          the consumer backs off and retries, exits after fault_timeout_s
    │       ├── StorageAccessDenied    credentials refused: AccessDenied, InvalidAccessKeyId,
    │       │   │                      SignatureDoesNotMatch, ExpiredToken
    │       │   └── ObjectAccessDenied AccessDenied (or a bare 403) on one object: probed before it is
    │       │                          blamed on the account or, as ObjectForbidden, on the object
    │       ├── BucketMissing          NoSuchBucket for a bucket METAVOICE_ALLOWED_BUCKETS names
    │       ├── StorageOutage          objects fail past their retries and a probe of the bucket fails too
    │       └── DeviceFault            a CUDA error, device OOM that persists at half the batch, or a
    │                                  model that fails a known-good probe clip as well
    └── FatalError                     the process cannot go on safely: stop without committing
        ├── OutputWriteFailed          a Parquet write/fsync/rename failed (disk full, read-only)
        │   └── FilesRemovedMeanwhile  a delete's rewrite lost a file to another commit (a compaction):
        │                              the ledger plans the delete again on the new version
        ├── DeadLetterFailed           the DLQ could not be written: the offset must not commit
        ├── Fenced                     another consumer committed these offsets to the table first (this
        │                              one lost its partitions, e.g. paused past the session timeout)
        ├── TableGap                   a partition's version in the table went back: a commit vanished
        ├── ModelUnavailable           weights cannot be found or loaded (fails at start-up)
        ├── OutputConfigMismatch       the output directory was built with other settings
        ├── OutputNotMigrated          a 0.1 output (Parquet files, no Delta table): `metavoice migrate` it
        └── MaintenanceRefused         `metavoice compact` / time travel cannot act safely: no table,
                                       a vacuum retention below the safe minimum without --force,
                                       a version the table no longer holds

`error_type` in a dead-letter record is the class name of a `PermanentError`.
"""

from __future__ import annotations


class PipelineError(Exception):
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


class AnalysisFailed(PermanentError):
    pass


class CrashLoop(PermanentError):
    """The record killed the process (OOM kill, native crash) max_attempts times in a row, the
    last ones alone: dead-lettered without processing it again (consumer/crash_guard.py)."""


class BucketNotAllowed(PermanentError):
    pass


class InvalidRequest(PermanentError):
    pass


class ObjectRejected(PermanentError):
    pass


class ObjectUnavailable(PermanentError):
    pass


class ObjectForbidden(PermanentError):
    """S3 denied this object while a probe with the same credentials shows they work: the denial
    is about the object (a policy on its key or prefix, its KMS key), so retrying cannot help."""


class VersionMismatch(PermanentError):
    """The stored object answers another etag than the event's, and HeadObject shows no overwrite
    after the event: the event names a version that never existed. Carries both etags."""

    def __init__(self, message: str, *, event_etag: str = "", stored_etag: str = "") -> None:
        super().__init__(message)
        self.event_etag, self.stored_etag = event_etag, stored_etag


class DownloadFailed(PermanentError):
    pass


class TransientError(PipelineError):
    """The world is briefly unwell: retried with backoff, never dead-lettered."""


class StorageUnavailable(TransientError):
    pass


class EnvironmentFault(TransientError):
    """Says nothing about the objects: never dead-letter them for it. `kind` labels the metric."""

    kind = "environment"


class StorageAccessDenied(EnvironmentFault):
    kind = "storage_access"


class ObjectAccessDenied(StorageAccessDenied):
    """AccessDenied on one object's request. Alone it proves nothing about the account: AWS answers
    403 for a missing key without s3:ListBucket, and for a deny on one prefix. Until probed it is
    the account fault it may be; `pipeline.storage.probe_access` decides."""


class BucketMissing(EnvironmentFault):
    kind = "bucket_missing"


class StorageOutage(EnvironmentFault):
    kind = "storage_outage"


class DeviceFault(EnvironmentFault):
    kind = "device"


class FatalError(PipelineError):
    """The consumer must stop without committing; a restart resumes safely."""


class OutputWriteFailed(FatalError):
    pass


class FilesRemovedMeanwhile(OutputWriteFailed):
    pass


class DeadLetterFailed(FatalError):
    pass


class Fenced(FatalError):
    pass


class TableGap(FatalError):
    """The table's version of a partition is older than one this process saw: a bug or a rewritten
    log. Going on could write offsets twice or skip them."""


class ModelUnavailable(FatalError):
    pass


class OutputConfigMismatch(FatalError):
    pass


class OutputNotMigrated(FatalError):
    """data/ holds Parquet files but no Delta table (an output written by 0.1)."""


class MaintenanceRefused(FatalError):
    """A maintenance or time-travel command refused before changing anything; the message says why."""
