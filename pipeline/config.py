"""Every setting of the system, typed, in one place.

Values come from `METAVOICE_*` environment variables (and a `.env` file when present);
CLI flags override them through `Settings.with_overrides`. S3 credentials follow the
standard AWS chain (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, profiles, instance
roles) unless given here explicitly; secrets are `SecretStr` so they never print.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .timeutil import parse_iso_time

Device = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
# The tokenizer families pipeline/tokenizers registers (tests/test_cli.py checks they agree), named
# here so that a misspelt one fails with the settings, before torch or any model is imported.
TOKENIZERS = ("synthetic", "encodec", "dac", "mimi")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="METAVOICE_", env_file=".env", extra="ignore", validate_default=True
    )

    # --- Kafka -------------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic: str = "r2-object-events"
    dlq_topic: str = ""  # empty: "<topic>.dlq"
    group: str = "metavoice-consumer"
    topic_partitions: int = Field(8, ge=1)
    topic_replication: int = Field(1, ge=1)
    # Events are the dataset's source of truth for replays: keep them forever by default.
    topic_retention_ms: int = -1
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    # Well under aiokafka's max_poll_interval_ms (300 s): a slow batch must never look dead.
    kafka_session_timeout_ms: int = 30_000
    # Static membership (KIP-345): a restarted member with the same id gets its partitions back
    # without a rebalance (on Tansu, without waiting for the departed member; docs in README).
    kafka_group_instance_id: str | None = None
    # How long producers and the consumer wait for the broker to answer at start-up (compose
    # starts everything at once), before they exit naming the address they tried.
    kafka_connect_timeout_s: float = Field(300.0, gt=0)

    # --- S3 / R2 -----------------------------------------------------------------------
    s3_endpoint_url: str | None = None
    s3_region: str = "auto"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    bucket: str | None = None
    download_concurrency: int = Field(8, ge=1)
    max_object_bytes: int = Field(512 * 1024 * 1024, ge=1)
    s3_retry_attempts: int = Field(8, ge=1)
    # Comma-separated bucket names (or arn:aws:s3:::name); events for others are dead-lettered
    # unread. Empty: the configured `bucket` when set, else any bucket (warned at start-up).
    allowed_buckets: str = ""

    # --- micro-batching and output -----------------------------------------------------
    # A local directory, or s3://bucket/prefix (R2, S3, MinIO): see pipeline/output/.
    output_dir: str | Path = "output"  # a Path given in code stays one
    # The output store's own endpoint and keys, when the dataset lives in another account than
    # the audio; unset: the S3 settings above.
    output_s3_endpoint_url: str | None = None
    output_s3_region: str | None = None
    output_s3_access_key_id: SecretStr | None = None
    output_s3_secret_access_key: SecretStr | None = None
    # Where in-progress Parquet files are written before they are uploaded (object-store output);
    # empty: `.metavoice-spool/` in the working directory. A local output spools in `<output>/_tmp`.
    spool_dir: str = ""
    # Multipart part size for uploads (R2: every part but the last must be this same size).
    output_part_bytes: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024 * 1024 * 1024)
    # A multipart upload under data/ older than this (by the server's clock) belongs to a dead writer and
    # is aborted at the next start. (0.1 claimed offsets with leases this long; the Delta log replaced them.)
    output_claim_ttl_s: float = Field(120.0, ge=10)
    # Conditional puts for delta-rs's own writes to the Delta log of an s3:// output (creation,
    # checkpoints, compaction; pipeline/output/table.py): auto = by ETag on any endpoint that is not AWS
    # S3 (R2, MinIO need it so two writers never overwrite a log entry), AWS's own put-if-absent there.
    output_conditional_put: Literal["auto", "etag", "none"] = "auto"
    # `metavoice compact` (pipeline/output/maintenance.py): small files are rewritten into files of
    # about this size; removed files are deleted once a commit removed them this many hours ago (the
    # time-travel window; below MIN_RETENTION_HOURS only with --force).
    compact_target_bytes: int = Field(128 * 1024 * 1024, ge=1024 * 1024)
    vacuum_retention_hours: int = Field(168, ge=0)
    batch_max_events: int = Field(32, ge=1)
    # Under a backlog (all pipeline_depth batches in flight, or a fetch came back full) a micro-batch
    # grows to this many events (still within batch_max_bytes and the linger): fewer flow runs per
    # event when it matters, for more audio in flight (docs/benchmarks.md: backlog memory). A
    # batch_max_events the user set is a bound (GPU memory, latency): unless this is set too, it
    # takes batch_max_events's value (`_derive_defaults`).
    batch_max_events_backlog: int = Field(256, ge=1)
    batch_max_bytes: int = Field(256 * 1024 * 1024, ge=1)
    batch_linger_ms: int = Field(500, ge=0)
    # A file never holds more than roll_max_rows rows nor roll_max_bytes bytes of rows (a micro-batch
    # is split across files; one event's rows always stay in one file - see pipeline/parquet.py).
    roll_max_rows: int = Field(10_000, ge=1)
    # Measured as the rows' Arrow size (uncompressed): the Parquet file is smaller, plus its footer.
    roll_max_bytes: int = Field(512 * 1024 * 1024, ge=1)
    roll_max_seconds: float = Field(300.0, gt=0)
    exit_when_idle: float | None = None
    shutdown_timeout: float = Field(120.0, gt=0)
    # A fault that is not about any object (refused S3 credentials, S3 down, a broken GPU) stops
    # batches without dead letters; past this long without recovering the consumer exits non-zero.
    fault_timeout_s: float = Field(600.0, gt=0)
    # One Kafka message may carry a list of events (S3 Records[], a webhook batch); more than this
    # is dead-lettered as one MalformedEvent, so one message cannot blow up a micro-batch.
    max_events_per_message: int = Field(1000, ge=1)
    # Every dead-letter record (key + value) stays under this; keep it below the DLQ topic's
    # max.message.bytes (1 MiB by default).
    dlq_max_record_bytes: int = Field(256 * 1024, ge=8192, le=16 * 1024 * 1024)
    from_beginning: bool = False
    from_timestamp: str | None = None
    force: bool = False
    min_duration_sec: float = Field(0.1, ge=0)
    max_duration_sec: float = Field(3600.0, gt=0)

    # --- models ------------------------------------------------------------------------
    # false: no Whisper is loaded; rows hold metadata and tokens, `transcription` is null
    transcribe: bool = True
    whisper_model: str = ""  # empty: bundled tiny.en when installed, else "tiny.en" from the hub
    device: Device = "auto"
    compute_type: str = "auto"  # auto: float16 on CUDA, int8 on CPU
    cpu_threads: int = 0  # 0: all cores
    whisper_batch_size: int = Field(0, ge=0)  # 0: 16 on CUDA, 8 on CPU
    beam_size: int = Field(1, ge=1)
    # fit: each chunk is encoded in a window that just fits it (~3x faster on CPU for short clips, same
    # accuracy on our corpus); full: Whisper's 30 s training window for every chunk.
    whisper_window: Literal["fit", "full"] = "fit"
    whisper_fit_margin_sec: float = Field(2.0, ge=0.5, le=30)  # silence after the audio in a fitted window
    whisper_fit_step_sec: float = Field(2.0, gt=0, le=30)  # fitted windows are rounded up to this
    language: str | None = None
    # file: one row per object version; utterances: one row per utterance (Silero VAD regions decoded by
    # Whisper in windows of up to 30 s, cut between the words at long pauses and speaker changes; each
    # utterance tokenized and scored from its own crop).
    segmentation: Literal["file", "utterances"] = "file"
    # false: no VAD, DNSMOS or speaker model is loaded; file rows only, their quality and speaker columns null
    analysis: bool = True
    # DNSMOS P.835 (dnsmos_* columns): auto = on with CUDA only; on this 2-core CPU it scores ~5 audio-s/s on
    # short clips (each filled to its 9 s input), a fifth of Whisper tiny.en's speed, with ~3 GB more peak
    # memory (README: cost per stage). off: the dnsmos_* columns are null.
    dnsmos: Literal["auto", "on", "off"] = "auto"
    utterance_min_sec: float = Field(1.0, gt=0, le=30)  # shorter speech joins a neighbour or grows into the silence around it
    utterance_max_sec: float = Field(30.0, gt=0, le=30)  # Whisper's window: an utterance is never longer
    utterance_pause_sec: float = Field(0.5, ge=0)  # a pause at least this long always ends an utterance
    tokenizer: str = "synthetic"
    tokenizer_weights: str | None = None
    tokenizer_bandwidth: float = 6.0
    tokenizer_batch_size: int = Field(8, ge=1)
    tokenizer_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    synthetic_load_ms: float = Field(0.0, ge=0)  # the seed burned ~200 ms of GPU per file
    tokenizer_codebooks: int = Field(0, ge=0)  # 0: from the bandwidth (encodec) or the codec's default
    # Long files are encoded in windows of this many seconds: device memory stays bounded.
    tokenizer_window_sec: float = Field(30.0, gt=0)
    tokenizer_context_sec: float | None = Field(None, ge=0)  # None: per codec (see docs/tokenizers.md)

    # --- orchestration and operations --------------------------------------------------
    prefect_enabled: bool = True
    # The longest one flow run may wait on the Prefect API (creating, starting, finishing it; stage
    # time does not count) before its micro-batch runs without a run record (see pipeline/flows.py).
    prefect_timeout_s: float = Field(10.0, gt=0)
    pipeline_depth: int = Field(3, ge=1)  # micro-batches in flight at once
    metrics_port: int | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: LogLevel = "INFO"  # any case: `debug` is DEBUG
    webhook_token: SecretStr | None = None
    webhook_hmac_secret: SecretStr | None = None

    # --- producers ---------------------------------------------------------------------
    webhook_max_body_bytes: int = Field(1024 * 1024, ge=1)  # larger bodies get 413
    # An HMAC-signed request is refused when its X-Metavoice-Timestamp is further than this from
    # the server's clock: a captured request cannot be replayed later.
    webhook_signature_window_s: int = Field(300, ge=1, le=86_400)
    # The whole body must arrive within this many seconds, else 408: a slow client cannot hold a handler.
    webhook_body_timeout_s: float = Field(10.0, gt=0, le=600)
    # The webhook answers 503 when Kafka has not acknowledged a request's events by then.
    producer_publish_timeout_s: float = Field(15.0, gt=0)
    cf_api_token: SecretStr | None = None  # Cloudflare API token with Queues Edit (r2-queue)
    cf_account_id: str | None = None
    cf_queue_id: str | None = None
    cf_api_base: str = "https://api.cloudflare.com/client/v4"
    # Cloudflare's API limit is 1200 requests per 5 minutes per account, pulls and acks together.
    cf_api_requests_per_5min: int = Field(1200, ge=1)

    @field_validator("spool_dir", mode="before")
    @classmethod
    def _path_as_text(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    # Values that would otherwise fail late (after partitions are assigned, after Whisper has
    # loaded) fail here, with the settings, before anything connects or loads.
    @field_validator("from_timestamp")
    @classmethod
    def _iso_time(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        parse_iso_time(v)
        return v.strip()

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, v: str) -> str:
        if v.split(":", 1)[0] not in TOKENIZERS:  # `family` or `family:checkpoint@...` (the Parquet column)
            raise ValueError(f"unknown tokenizer (choose {', '.join(TOKENIZERS[:-1])} or {TOKENIZERS[-1]})")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) and v.strip().upper() in get_args(LogLevel) else v

    # Fields `_derive_defaults` filled in from others (not given by the user): `explicit()` leaves them out.
    _derived: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="after")
    def _derive_defaults(self) -> "Settings":
        if self.segmentation == "utterances" and not self.analysis:
            raise ValueError("segmentation=utterances needs the analysis models (analysis=true): the VAD cuts them")
        if self.utterance_min_sec > self.utterance_max_sec:
            raise ValueError("utterance_min_sec must not exceed utterance_max_sec")
        given = set(self.model_fields_set)  # passed in code, or found in the environment / .env
        derived = set()
        if not self.dlq_topic:
            self.dlq_topic = f"{self.topic}.dlq"
            derived.add("dlq_topic")
        if "batch_max_events" in given and "batch_max_events_backlog" not in given:
            self.batch_max_events_backlog = self.batch_max_events
            derived.add("batch_max_events_backlog")
        self._derived = frozenset(derived)
        return self

    def explicit(self) -> frozenset[str]:
        """The settings the user chose (code, environment, .env, flags); the rest are defaults or derived."""
        return frozenset(self.model_fields_set - self._derived)

    def child_env(self) -> dict[str, str]:
        """`METAVOICE_*` variables that give a child process these settings: every setting chosen
        (`explicit()`), derived from the fields so none is forgotten (segmentation, dnsmos, ...).
        Secrets are left out: a child takes them from its own environment."""
        env = {}
        for name in sorted(self.explicit()):
            value = getattr(self, name)
            if value is None or isinstance(value, SecretStr):
                continue
            env[f"METAVOICE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def allowed_bucket_set(self) -> frozenset[str] | None:
        """Buckets events may name; None: any."""
        names = [b.strip() for b in self.allowed_buckets.split(",") if b.strip()]
        if not names and self.bucket:
            names = [self.bucket]
        if not names:
            return None
        return frozenset(n.removeprefix("arn:aws:s3:::").removeprefix("arn:aws:r2:::") for n in names)

    def from_timestamp_utc(self) -> datetime | None:
        """`from_timestamp` as an aware UTC time (a time without a zone is taken as UTC)."""
        return parse_iso_time(self.from_timestamp) if self.from_timestamp else None

    def with_overrides(self, **overrides: Any) -> "Settings":
        """Apply CLI flags over env/defaults; `None` means "flag not given"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        # Only what was chosen is carried over: defaults and derived values derive again from the
        # new choices (an explicit batch size caps the backlog size unless that was chosen too).
        data = {k: getattr(self, k) for k in self.explicit()}
        data.update(given)
        if "topic" in given and "dlq_topic" not in given and self.dlq_topic == f"{self.topic}.dlq":
            data.pop("dlq_topic", None)
        return type(self)(**data)  # (model_validate would drop the private `_derived`)

    # --- derived views used by the clients --------------------------------------------
    def s3_client_kwargs(self) -> dict[str, Any]:
        """The audio store's client (downloads, listings)."""
        return _s3_kwargs(self.s3_endpoint_url, self.s3_region, self.s3_access_key_id, self.s3_secret_access_key)

    def output_s3_client_kwargs(self) -> dict[str, Any]:
        """The output store's client: its own endpoint/region/keys where set, else the audio store's."""
        own_keys = self.output_s3_access_key_id is not None and self.output_s3_secret_access_key is not None
        return _s3_kwargs(self.output_s3_endpoint_url or self.s3_endpoint_url, self.output_s3_region or self.s3_region,
                          *((self.output_s3_access_key_id, self.output_s3_secret_access_key) if own_keys
                            else (self.s3_access_key_id, self.s3_secret_access_key)))

    def resolved_cpu_threads(self) -> int:
        return self.cpu_threads or (os.cpu_count() or 1)


def _s3_kwargs(endpoint: str | None, region: str, key: SecretStr | None, secret: SecretStr | None) -> dict[str, Any]:
    """botocore client arguments; without explicit keys the standard AWS chain applies."""
    kwargs: dict[str, Any] = {"region_name": region}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if key is not None and secret is not None:
        kwargs["aws_access_key_id"] = key.get_secret_value()
        kwargs["aws_secret_access_key"] = secret.get_secret_value()
    return kwargs
