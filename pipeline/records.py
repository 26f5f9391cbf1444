"""The output record and its Parquet schema, declared once.

`TranscribedAudio` is the declaration: its fields, in Parquet column order, each carry their Arrow type
(`column(...)`), and `token_codebooks` is a column derived from `tokens` (`derived_column`). Everything
else is read off it:

    SCHEMA          the Arrow/Parquet schema of every output file
    to_table        rows -> Arrow table in `SCHEMA` (the writer's hot path)
    read_records    Parquet file / Arrow table / pyarrow dataset -> rows (`iter_records` streams them)
    version_hashes  the object versions (bucket, id, etag) of a table's rows, as the dedupe index keys them

so adding, renaming or retyping a column is one edit. The writer, the summary, the report and the tests
all use `SCHEMA` and `TranscribedAudio`. With transcription off (`transcribe=false`) a row has no
transcript: `transcription`, `language`, `segments` and `whisper_model` are null (every column of
`SCHEMA` is nullable).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_ARROW = "arrow"  # field metadata: the column's Arrow type
_TO_ARROW = "to_arrow"  # field metadata: a column's Python values -> what `pa.array` takes, or a `pa.Array`
_FROM_ARROW = "from_arrow"  # field metadata: an Arrow array -> the column's Python values


_NO_DEFAULT: Any = object()


def column(
    arrow_type: pa.DataType,
    *,
    to_arrow: Callable[[list[Any]], Any] | None = None,
    from_arrow: Callable[[pa.Array], list[Any]] | None = None,
    default: Any = _NO_DEFAULT,
) -> Any:
    """A dataclass field that is also a Parquet column of `arrow_type`.

    Plain values go through `pa.array(values, type=arrow_type)` and `Array.to_pylist()`; a column whose
    Python values are not what Arrow takes or gives (dataclasses, numpy arrays) names its converters.
    A `default` (immutable only) lets code that does not know a column leave it out.
    """
    meta = {_ARROW: arrow_type, _TO_ARROW: to_arrow, _FROM_ARROW: from_arrow}
    return field(metadata=meta) if default is _NO_DEFAULT else field(default=default, metadata=meta)


class DerivedColumn(property):
    """A read-only property that is also a Parquet column, written right after the field `after`.

    It is written from the record and not read back: the record computes it. Declared with `derived_column`.
    """

    def __init__(self, fget: Callable[[Any], Any], arrow_type: pa.DataType, after: str) -> None:
        super().__init__(fget, doc=fget.__doc__)
        self.arrow_type = arrow_type
        self.after = after


def derived_column(arrow_type: pa.DataType, *, after: str) -> Callable[[Callable[[Any], Any]], DerivedColumn]:
    """`@derived_column(pa.int16(), after="tokens")` on a method: a property written as a column."""
    return lambda fget: DerivedColumn(fget, arrow_type, after)


def arrow_fields(cls: type) -> list[pa.Field]:
    """The Arrow fields of a dataclass declared with `column(...)`, in field order (for struct types)."""
    return [pa.field(f.name, f.metadata[_ARROW]) for f in fields(cls)]


@dataclass(slots=True)
class Segment:
    start: float = column(pa.float32())
    end: float = column(pa.float32())
    text: str = column(pa.string())


@dataclass(slots=True)
class Word:
    """One recognised word with its time (seconds) and Whisper's probability for it."""

    start: float = column(pa.float64())
    end: float = column(pa.float64())
    word: str = column(pa.string())
    probability: float = column(pa.float32())


@dataclass(slots=True)
class Transcript:
    """What `WhisperTranscriber.transcribe_batch` returns per clip; times are seconds from the clip's start.

    The Whisper statistics are over the clip's decoded tokens (None where nothing was decoded):
    `avg_logprob` (mean token log-probability), `no_speech_prob` (the decoder's no-speech
    probability at the first step of the clip's first window), `compression_ratio` of the text
    (zlib; loops compress well), `language_probability` (1.0 for an English-only model).
    """

    text: str
    language: str
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    language_probability: float | None = None


SEGMENT_TYPE = pa.struct(arrow_fields(Segment))
TOKENS_TYPE = pa.list_(pa.list_(pa.int16()))  # [codebooks][frames]

_segment_values = attrgetter(*(f.name for f in fields(Segment)))  # Segment -> (start, end, text)


def _segments_to_arrow(values: list[list[Segment] | None]) -> list[list[tuple[Any, ...]] | None]:
    return [None if segs is None else [_segment_values(s) for s in segs] for segs in values]


def _segments_from_arrow(array: pa.Array) -> list[list[Segment] | None]:
    return [None if segs is None else [Segment(**s) for s in segs] for segs in array.to_pylist()]


def _tokens_to_arrow(values: list[np.ndarray]) -> pa.Array:
    """int16 `[codebooks, frames]` arrays -> one nested list column, offsets computed with numpy."""
    codes = []
    for v in values:
        c = np.asarray(v, dtype=np.int16)
        codes.append(c if c.ndim == 2 else c.reshape(0, 0))  # no tokens: an empty array of any shape
    books = np.fromiter((c.shape[0] for c in codes), np.int64, len(codes))
    frames = np.fromiter((c.shape[1] for c in codes), np.int64, len(codes))
    outer = np.zeros(len(codes) + 1, np.int64)
    np.cumsum(books, out=outer[1:])
    inner = np.zeros(int(outer[-1]) + 1, np.int64)
    np.cumsum(np.repeat(frames, books), out=inner[1:])
    flat = np.concatenate([c.reshape(-1) for c in codes]) if codes else np.zeros(0, np.int16)
    # int64 -> int32 is a checked cast: a batch past 2**31 codes fails loudly instead of wrapping
    books_array = pa.ListArray.from_arrays(pa.array(inner, pa.int32()), pa.array(flat, pa.int16()))
    return pa.ListArray.from_arrays(pa.array(outer, pa.int32()), books_array)


def _tokens_from_arrow(array: pa.Array) -> list[np.ndarray]:
    """One nested list column -> int16 `[codebooks, frames]` arrays (`(0, 0)` for null or empty cells)."""
    books, codes = array.values, array.values.values  # children, unsliced: `offsets` index into them
    if codes.null_count:
        raise ValueError("tokens: a codebook holds null codes")
    outer = array.offsets.to_numpy()
    inner = books.offsets.to_numpy()
    flat = codes.to_numpy().copy()  # writable, and independent of the Arrow buffers
    lengths, counts = np.diff(inner), np.diff(outer)  # frames of each codebook, codebooks of each row
    row_first = np.repeat(outer[:-1][counts > 0], counts[counts > 0])  # each codebook's row's first codebook
    if np.any(lengths[outer[0] : outer[-1]] != lengths[row_first]):
        raise ValueError("tokens: the codebooks of a row differ in length")
    valid = array.is_valid().to_numpy(zero_copy_only=False) if array.null_count else None
    out = []
    for i in range(len(array)):
        a, b = int(outer[i]), int(outer[i + 1])
        if a == b or (valid is not None and not valid[i]):
            out.append(np.zeros((0, 0), np.int16))
        else:
            s, e = int(inner[a]), int(inner[b])
            out.append(flat[s:e].reshape(b - a, (e - s) // (b - a)))
    return out


# The struct of a `Word` (21a's dataclass above); times are absolute seconds in the source file.
WORD_TYPE = pa.struct([pa.field("start", pa.float64()), pa.field("end", pa.float64()),
                       pa.field("word", pa.string()), pa.field("probability", pa.float32())])
_word_values = attrgetter("start", "end", "word", "probability")


def _words_to_arrow(values: list[list[Any] | None]) -> list[list[tuple[Any, ...]] | None]:
    return [None if ws is None else [_word_values(w) for w in ws] for ws in values]


def _words_from_arrow(array: pa.Array) -> list[list[Any] | None]:
    return [None if ws is None else [Word(**w) for w in ws] for ws in array.to_pylist()]


def _embedding_to_arrow(values: list[np.ndarray | None]) -> list[list[float] | None]:
    return [None if v is None else np.asarray(v, np.float32).tolist() for v in values]


def _embedding_from_arrow(array: pa.Array) -> list[np.ndarray | None]:
    return [None if v is None else np.asarray(v, np.float32) for v in array.to_pylist()]


@dataclass(slots=True, kw_only=True)
class TranscribedAudio:
    """One output row. The fields are the Parquet columns, in order, each with its Arrow type."""

    id: str = column(pa.string())
    bucket: str = column(pa.string())
    etag: str = column(pa.string())
    size_bytes: int = column(pa.int64())
    event_time: datetime | None = column(pa.timestamp("ms", tz="UTC"))
    duration_sec: float = column(pa.float64())
    sampling_rate: int = column(pa.int32())
    channels: int = column(pa.int16())
    transcription: str | None = column(pa.string())  # None: transcription was off
    language: str | None = column(pa.string())
    segments: list[Segment] | None = column(
        pa.list_(SEGMENT_TYPE), to_arrow=_segments_to_arrow, from_arrow=_segments_from_arrow
    )
    tokens: np.ndarray = column(TOKENS_TYPE, to_arrow=_tokens_to_arrow, from_arrow=_tokens_from_arrow)  # int16
    # token_codebooks (derived from tokens, below) is written here
    token_frame_rate: float = column(pa.float32())
    tokenizer: str = column(pa.string())
    whisper_model: str | None = column(pa.string())
    kafka_topic: str = column(pa.string())
    kafka_partition: int = column(pa.int32())
    kafka_offset: int = column(pa.int64())
    processed_at: datetime = column(pa.timestamp("ms", tz="UTC"))
    # --- one utterance (segmentation=utterances) or the whole file (segmentation=file, utterance 0) ---------
    # Appended after the columns files held before them. Null in files written before they existed.
    utterance: int = column(pa.int32(), default=0)  # 0-based within the object version
    start_sec: float = column(pa.float64(), default=0.0)  # absolute seconds in the source file
    end_sec: float = column(pa.float64(), default=0.0)
    words: list[Any] | None = column(pa.list_(WORD_TYPE), to_arrow=_words_to_arrow, from_arrow=_words_from_arrow,
                                     default=None)
    speaker: str | None = column(pa.string(), default=None)  # S0, S1, ... within the object version
    speaker_embedding: np.ndarray | None = column(pa.list_(pa.float32()), to_arrow=_embedding_to_arrow,
                                                  from_arrow=_embedding_from_arrow, default=None)
    dnsmos_ovrl: float | None = column(pa.float32(), default=None)  # DNSMOS P.835, 1-5
    dnsmos_sig: float | None = column(pa.float32(), default=None)
    dnsmos_bak: float | None = column(pa.float32(), default=None)
    snr_db: float | None = column(pa.float32(), default=None)
    bandwidth_hz: float | None = column(pa.float32(), default=None)
    clipping_ratio: float | None = column(pa.float32(), default=None)
    rms_dbfs: float | None = column(pa.float32(), default=None)
    speech_ratio: float | None = column(pa.float32(), default=None)
    avg_logprob: float | None = column(pa.float32(), default=None)  # Whisper's own confidences
    no_speech_prob: float | None = column(pa.float32(), default=None)
    compression_ratio: float | None = column(pa.float32(), default=None)
    language_probability: float | None = column(pa.float32(), default=None)
    flags: list[str] | None = column(pa.list_(pa.string()), default=None)  # e.g. hallucination_suspected
    vad_model: str | None = column(pa.string(), default=None)  # the analysis models' names (also _manifest.json)
    dnsmos_model: str | None = column(pa.string(), default=None)
    speaker_model: str | None = column(pa.string(), default=None)
    # the S3 versionId the row was made from (None: R2, an unversioned bucket, or a file written before
    # the column): a delete naming a version removes that version's rows only
    version_id: str | None = column(pa.string(), default=None)

    @derived_column(pa.int16(), after="tokens")
    def token_codebooks(self) -> int:
        return int(self.tokens.shape[0]) if self.tokens.ndim == 2 else 0

    @property
    def token_frames(self) -> int:
        return int(self.tokens.shape[1]) if self.tokens.ndim == 2 else 0


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    type: pa.DataType
    get: Callable[[Any], Any]
    to_arrow: Callable[[list[Any]], Any] | None
    from_arrow: Callable[[pa.Array], list[Any]] | None
    stored: bool  # a dataclass field, read back; else derived from the others, only written


def _columns(cls: type) -> tuple[_Column, ...]:
    derived: dict[str, list[tuple[str, DerivedColumn]]] = {}
    for name, attr in vars(cls).items():
        if isinstance(attr, DerivedColumn):
            derived.setdefault(attr.after, []).append((name, attr))
    out = []
    for f in fields(cls):
        if _ARROW not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with column(...)")
        out.append(_Column(f.name, f.metadata[_ARROW], attrgetter(f.name), f.metadata[_TO_ARROW],
                           f.metadata[_FROM_ARROW], stored=True))
        for name, attr in derived.pop(f.name, []):
            out.append(_Column(name, attr.arrow_type, attrgetter(name), None, None, stored=False))
    if derived:
        raise TypeError(f"derived columns placed after unknown fields: {sorted(derived)}")
    return tuple(out)


_COLUMNS = _columns(TranscribedAudio)
_STORED = tuple(c for c in _COLUMNS if c.stored)
_STORED_NAMES = [c.name for c in _STORED]

SCHEMA = pa.schema([pa.field(c.name, c.type) for c in _COLUMNS])
# Columns appended after files were first written, with what an older file's rows read as.
_APPENDED = {f.name: f.default for f in fields(TranscribedAudio) if f.default is not MISSING}


def to_table(rows: list[TranscribedAudio]) -> pa.Table:
    """Rows -> Arrow table in `SCHEMA`; tokens go in as nested int16 lists without Python loops per code."""
    arrays = []
    for c in _COLUMNS:
        values = list(map(c.get, rows))
        converted = c.to_arrow(values) if c.to_arrow is not None else values
        arrays.append(converted if isinstance(converted, pa.Array) else pa.array(converted, type=c.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


if TYPE_CHECKING:
    import pyarrow.dataset

    RecordSource = str | os.PathLike[str] | pa.Table | pa.RecordBatch | pyarrow.dataset.Dataset


def iter_records(source: RecordSource, *, batch_size: int = 4096) -> Iterator[TranscribedAudio]:
    """The rows of a Parquet file (path), an Arrow table or record batch, or a pyarrow dataset, in order.

    Columns are found by name (others are ignored); one of another type than in `SCHEMA` is refused.
    For an output directory, pass a dataset of its finalized `.parquet` files, e.g.
    `pyarrow.dataset.dataset(paths, format="parquet")`, rather than a directory that may hold a file
    still being written.
    """
    for batch in _batches(source, batch_size):
        yield from _records_of(batch)


def read_records(source: RecordSource) -> list[TranscribedAudio]:
    """All rows of `source` (see `iter_records`) as `TranscribedAudio`: `to_table`'s inverse."""
    return list(iter_records(source))


def _batches(source: RecordSource, batch_size: int) -> Iterable[pa.RecordBatch]:
    if isinstance(source, pa.Table):
        return source.select(_STORED_NAMES).to_batches(max_chunksize=batch_size)
    if isinstance(source, pa.RecordBatch):
        return [source.select(_STORED_NAMES)]
    if isinstance(source, (str, os.PathLike)):
        return _file_batches(source, batch_size)
    import pyarrow.dataset as ds  # only when given one: importing it is not free

    if isinstance(source, ds.Dataset):
        return source.to_batches(columns=_STORED_NAMES, batch_size=batch_size)
    raise TypeError(f"cannot read records from {type(source).__name__}")


def _file_batches(path: str | os.PathLike[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    with pq.ParquetFile(path) as f:
        held = set(f.schema_arrow.names)  # a file written before the utterance columns lacks them
        yield from f.iter_batches(batch_size=batch_size, columns=[n for n in _STORED_NAMES if n in held])


def _records_of(batch: pa.RecordBatch) -> list[TranscribedAudio]:
    values = []
    held = set(batch.schema.names)
    for c in _STORED:
        if c.name not in held and c.name in _APPENDED:  # an older file: the column's default
            values.append([_APPENDED[c.name]] * batch.num_rows)
            continue
        array = batch.column(c.name)
        if not array.type.equals(c.type):
            raise ValueError(f"column {c.name!r} is {array.type}, not {c.type} as in SCHEMA")
        values.append(c.from_arrow(array) if c.from_arrow is not None else array.to_pylist())
    return [TranscribedAudio(**dict(zip(_STORED_NAMES, row))) for row in zip(*values)]


def tokens_from_column(value: list[list[int]] | None) -> np.ndarray:
    """A row's `tokens` cell back to int16 `[codebooks, frames]`."""
    if not value:
        return np.zeros((0, 0), dtype=np.int16)
    return np.asarray(value, dtype=np.int16)


def object_version_hash(bucket: str, key: str, etag: str) -> int:
    """An object version's 64-bit key in the dedupe index (pipeline/ledger.py) and in a table
    commit's metadata (`metavoice.versions`): what "already written" means."""
    digest = hashlib.blake2b(f"{bucket}\x00{key}\x00{etag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=False)


def version_hashes(table: pa.Table) -> np.ndarray:
    """The distinct object versions of `table`'s rows (an object's utterances are one version)."""
    cols = [table.column(c).to_pylist() for c in ("bucket", "id", "etag")]
    return np.unique(np.fromiter((object_version_hash(b, k, e or "") for b, k, e in zip(*cols)),
                                 dtype=np.uint64, count=table.num_rows))
