"""Failures of the Kafka side, grafted onto the pipeline's tree (`pipeline.errors`).

    PipelineError
    ├── TransientError
    │   └── KafkaUnavailable          the broker did not answer or acknowledge in time: retry, never
    │       │                         acknowledge anything upstream
    │       └── BrokerUnreachable     no answer within METAVOICE_KAFKA_CONNECT_TIMEOUT_S at start-up:
    │                                 the process exits naming the address it tried
    └── FatalError
        └── DeadLetterTopicUnusable   the DLQ cannot be created, or keeps dead letters shorter than
                                      the events topic keeps events
"""

from __future__ import annotations

from pipeline.errors import FatalError, TransientError


class KafkaUnavailable(TransientError):
    """Kafka could not be reached or did not acknowledge: nothing may be acknowledged upstream."""


class BrokerUnreachable(KafkaUnavailable):
    """The broker refused connections for the whole start-up wait; the message names the
    bootstrap address and the setting that bounds the wait."""


class DeadLetterTopicUnusable(FatalError):
    """The DLQ topic cannot be created, or keeps dead letters shorter than events are kept."""
