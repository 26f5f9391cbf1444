"""Decode: bytes of an audio object -> the views of it the models read, in one streaming pass.

FLAC and everything else libsndfile reads are accepted. The file is read in blocks; each block is
downmixed and fed to one streaming soxr resampler (high quality) per view: Whisper's 16 kHz mono and
the tokenizer's own layout (`DecodeSpec`). Native samples are never held whole, so memory follows
the views, not the source format: a 25-minute 96 kHz 8-channel file is 4.6 GB as native float32,
its 16 kHz mono view 96 MB. Native rate, channel count and duration are kept as metadata.

The duration limit is checked from the header before any sample is decoded, and again while
decoding: a file whose header does not know its length (a FLAC encoded from a pipe) is stopped as
soon as it passes the limit.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from .errors import DurationOutOfRange, EmptyObject, NotAudio, PermanentError

WHISPER_SAMPLE_RATE = 16_000
# Native frames per read: 2 MB of float32 at 8 channels, small beside any view yet long enough
# that per-block overhead (Python, soxr calls) stays negligible.
BLOCK_FRAMES = 65_536
# libsndfile says SF_COUNT_MAX (2**63 - 1) frames when a header does not know its length.
_UNKNOWN_LENGTH = 2**62
# A view's first allocation when the header does not say the length (grown by doubling), and the
# most reserved up front on a header's word (a lying header must not reserve terabytes).
_UNKNOWN_LENGTH_RESERVE_SEC = 60
_MOST_RESERVED_SEC = 3600


@dataclass(frozen=True, slots=True)
class AudioLayout:
    """Samples a model reads: `sample_rate` Hz in `channels` channels.

    One channel is the mono downmix (mean of the file's channels); the file's own channel count
    keeps its channels; any other count repeats the downmix (a stereo codec fed a 5.1 file).
    """

    sample_rate: int
    channels: int = 1

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.channels <= 0:
            raise ValueError(f"a layout needs a positive rate and channel count, got {self}")


WHISPER_LAYOUT = AudioLayout(WHISPER_SAMPLE_RATE)
#: What the synthetic tokenizer and the default encodec, dac and mimi checkpoints read.
BUILTIN_TOKENIZER_LAYOUT = AudioLayout(24_000)


@dataclass(frozen=True, slots=True)
class DecodeSpec:
    """What a decode makes (the layouts the models read) and accepts (the duration range).

    The default serves callers that do not know the tokenizer (bench, tools, tests): Whisper's
    layout and the one every built-in tokenizer reads. The pipeline builds one from the loaded
    models (`Models.layouts`, through `batch.decode_stage`).
    """

    layouts: tuple[AudioLayout, ...] = (WHISPER_LAYOUT, BUILTIN_TOKENIZER_LAYOUT)
    min_duration_sec: float = 0.0
    max_duration_sec: float = math.inf


@dataclass(slots=True)
class DecodedAudio:
    """One decoded file: its native format as metadata, and the views decode made of it."""

    sample_rate: int  # native
    channels: int  # native
    frames: int  # native frames decoded
    views: dict[AudioLayout, np.ndarray]  # float32: [frames] for one channel, else [frames, channels]

    @property
    def duration_sec(self) -> float:
        return self.frames / float(self.sample_rate)

    def view(self, layout: AudioLayout) -> np.ndarray:
        """The samples in `layout`; only layouts named in the `DecodeSpec` were made."""
        try:
            return self.views[layout]
        except KeyError:
            made = ", ".join(f"{v.sample_rate} Hz x {v.channels}" for v in self.views) or "none"
            raise LookupError(
                f"no {layout.sample_rate} Hz x {layout.channels} view was decoded (made: {made}); "
                "name the layout in the DecodeSpec"
            ) from None

    def at_rate(self, rate: int, *, mono: bool = True) -> np.ndarray:
        """Samples at `rate`: [frames] when mono, else [frames, channels] in the file's channels."""
        if mono:
            return self.view(AudioLayout(rate, 1))
        samples = self.view(AudioLayout(rate, self.channels))
        return samples if samples.ndim == 2 else samples[:, None]

    @classmethod
    def from_samples(cls, samples: np.ndarray, sample_rate: int, spec: DecodeSpec = DecodeSpec()) -> "DecodedAudio":
        """Views of samples already in memory ([frames] or [frames, channels]), made as decode makes them."""
        x = np.asarray(samples, dtype=np.float32)
        x = x[:, None] if x.ndim == 1 else x
        blocks = (x[i : i + BLOCK_FRAMES] for i in range(0, x.shape[0], BLOCK_FRAMES))
        return _decode_blocks(blocks, int(sample_rate), x.shape[1], x.shape[0], spec)


def decode_audio(data: bytes, spec: DecodeSpec = DecodeSpec()) -> DecodedAudio:
    """The views `spec` names; every failure is a `PermanentError` (one bad object never escapes).

    EmptyObject: zero bytes. NotAudio: unreadable, corrupt, no samples, NaN/inf samples, or any
    decoder failure (libsndfile error, out of memory). DurationOutOfRange: too long from the header
    when it says the length (nothing decoded), else as soon as decoding passes the maximum; too
    short once decoded.
    """
    if not data:
        raise EmptyObject("object is empty (0 bytes)")
    try:
        with _ForwardReader(io.BytesIO(data)) as f:
            rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
            if rate <= 0 or channels <= 0:
                raise NotAudio(f"header says {rate} Hz, {channels} channels")
            known = frames if 0 < frames < _UNKNOWN_LENGTH else None
            if known is not None and known / rate > spec.max_duration_sec:
                raise DurationOutOfRange(
                    f"duration {known / rate:.3f}s (from the header) is longer than the maximum "
                    f"{spec.max_duration_sec}s"
                )
            return _decode_blocks(_blocks(f), rate, channels, known, spec)
    except PermanentError as exc:
        error = exc.with_traceback(None)
    except Exception as exc:  # libsndfile errors, MemoryError, ...: this object fails, not the batch
        error = NotAudio(f"not readable audio: {type(exc).__name__}: {exc}")
    # Raised here, without the decoder's frames as traceback or context: they hold the partial views
    # (up to the duration limit), which a dead letter waiting in its batch must not keep alive.
    raise error


# --- the streaming pass ------------------------------------------------------------------------


class _ForwardReader(sf.SoundFile):
    """A SoundFile read front to back only.

    soundfile seeks after every read of a seekable file, and libsndfile cannot seek to the end of
    a FLAC whose STREAMINFO says 0 total samples (unknown length, as encoders writing to a pipe
    leave it): the last read would fail. Reported unseekable, such a file reads to its end.
    """

    def seekable(self) -> bool:
        return False


def _blocks(f: sf.SoundFile) -> Iterator[np.ndarray]:
    while True:
        block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            return
        yield block


def _decode_blocks(
    blocks: Iterable[np.ndarray], rate: int, channels: int, known_frames: int | None, spec: DecodeSpec
) -> DecodedAudio:
    """Native [frames, channels] float32 blocks -> the spec's views, checked as they pass."""
    writers = [_ViewWriter(layout, rate, channels, known_frames) for layout in dict.fromkeys(spec.layouts)]
    frames = 0
    for block in blocks:
        if not np.isfinite(block).all():
            raise NotAudio("audio holds NaN or infinite samples")
        frames += block.shape[0]
        if frames / rate > spec.max_duration_sec:
            raise DurationOutOfRange(
                f"duration passed the maximum {spec.max_duration_sec}s while decoding (at {frames / rate:.3f}s)"
            )
        mono = block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float32)
        for w in writers:
            w.push(block, mono)
    if frames == 0:
        raise NotAudio("audio holds no samples")
    if frames / rate < spec.min_duration_sec:
        raise DurationOutOfRange(
            f"duration {frames / rate:.3f}s is shorter than the minimum {spec.min_duration_sec}s"
        )
    return DecodedAudio(rate, channels, frames, {w.layout: w.finish() for w in writers})


class _ViewWriter:
    """One view, block by block: the layout's channels, a streaming resampler, one growing array."""

    def __init__(self, layout: AudioLayout, rate: int, channels: int, known_frames: int | None) -> None:
        self.layout = layout
        self.keeps_channels = layout.channels == channels > 1
        self.width = channels if self.keeps_channels else 1
        self.resampler = (
            None
            if layout.sample_rate == rate
            else soxr.ResampleStream(rate, layout.sample_rate, self.width, dtype="float32", quality="HQ")
        )
        if known_frames is None:
            reserve = layout.sample_rate * _UNKNOWN_LENGTH_RESERVE_SEC
        else:  # soxr emits round(frames x ratio) in all; a little more room costs nothing
            expected = math.ceil(known_frames * layout.sample_rate / rate) + 16
            reserve = min(expected, layout.sample_rate * _MOST_RESERVED_SEC)
        self.buffer = _GrowingArray(reserve, self.width)

    def push(self, block: np.ndarray, mono: np.ndarray) -> None:
        x = block if self.keeps_channels else mono
        self.buffer.append(x if self.resampler is None else self.resampler.resample_chunk(x))

    def finish(self) -> np.ndarray:
        if self.resampler is not None:  # the resampler's delay line: the last output samples
            tail = np.zeros((0, self.width) if self.keeps_channels else 0, dtype=np.float32)
            self.buffer.append(self.resampler.resample_chunk(tail, last=True))
        samples = self.buffer.result()
        if self.layout.channels > 1 and not self.keeps_channels:
            samples = np.repeat(samples[:, None], self.layout.channels, axis=1)
        return samples


class _GrowingArray:
    """float32 rows appended into one array: reserved from the header's length, doubled past it.

    Reserved pages that are never written are never resident, so reserving from a header costs
    nothing when the file turns out shorter.
    """

    def __init__(self, reserve: int, width: int) -> None:
        self.tail = () if width == 1 else (width,)
        self.data = np.empty((max(1, reserve), *self.tail), dtype=np.float32)
        self.size = 0

    def append(self, x: np.ndarray) -> None:
        end = self.size + x.shape[0]
        if end > self.data.shape[0]:
            grown = np.empty((max(end, 2 * self.data.shape[0]), *self.tail), dtype=np.float32)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : end] = x
        self.size = end

    def result(self) -> np.ndarray:
        out = self.data[: self.size]
        return out.copy() if self.size < self.data.shape[0] // 2 else out
