"""Failures the producers name, grafted onto the pipeline's tree (`pipeline.errors`).

    PipelineError
    ├── PermanentError
    │   └── MalformedEvent          (pipeline.errors) a body that is not an event: DLQ or HTTP 400
    ├── TransientError
    │   ├── KafkaUnavailable        (broker.errors) the broker did not acknowledge in time: retry,
    │   │   │                       never ack early
    │   │   └── BrokerUnreachable   (broker.errors) no broker within METAVOICE_KAFKA_CONNECT_TIMEOUT_S
    │   ├── StorageUnavailable      (pipeline.errors) one listing request failed; retried s3_retry_attempts times
    │   ├── EnvironmentFault        (pipeline.errors) a backfill's listing cannot go on:
    │   │   ├── BucketMissing           the bucket does not exist at the endpoint
    │   │   ├── StorageAccessDenied     the endpoint refused the credentials
    │   │   └── StorageOutage           the endpoint did not answer past the retries
    │   └── QueueApiUnavailable     Cloudflare API 429/5xx/network failure: back off, try again
    └── FatalError
        ├── QueueApiRejected        Cloudflare API refused the request (bad token, unknown queue)
        ├── CheckpointMismatch      a backfill checkpoint written for another bucket or filters
        └── WebhookMisconfigured    no bearer token and no HMAC secret: refusing to run open
"""

from __future__ import annotations

from broker.errors import BrokerUnreachable, KafkaUnavailable
from pipeline.errors import FatalError, TransientError

__all__ = ["BrokerUnreachable", "CheckpointMismatch", "KafkaUnavailable", "QueueApiRejected",
           "QueueApiUnavailable", "WebhookMisconfigured"]


class QueueApiUnavailable(TransientError):
    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status  # HTTP status, None for a network failure


class QueueApiRejected(FatalError):
    """A 4xx other than 429: retrying cannot help; fix the token, account or queue id."""


class CheckpointMismatch(FatalError):
    """The checkpoint belongs to another run; delete it or pass another --checkpoint file."""


class WebhookMisconfigured(FatalError):
    """Set METAVOICE_WEBHOOK_TOKEN and/or METAVOICE_WEBHOOK_HMAC_SECRET."""
