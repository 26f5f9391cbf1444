"""The loaded models and the one thread that runs them.

Whisper (unless `transcribe` is off: then `NoTranscription` stands in and nothing is loaded) and
the tokenizer share one device; a single worker thread runs all model work in the
order it is asked for, so the GPU is never oversubscribed and the event loop never blocks on it.
CPU-bound preprocessing (decode, resample, Parquet encoding) runs on a separate small pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, TypeVar

from .audio import WHISPER_LAYOUT, AudioLayout
from .config import Settings
from .tokenizers import AudioTokenizer, load_tokenizer
from .device import resolve_device
from .transcribe import WhisperTranscriber

log = logging.getLogger(__name__)
R = TypeVar("R")


class DeviceThread:
    """One thread for all model work, oldest batch first.

    A plain FIFO would run batch 2's transcription before batch 1's tokenization (both queued
    while batch 1 transcribed), so every batch would wait behind `pipeline_depth - 1` others:
    latency and in-flight memory would grow with the depth. Priority = batch sequence number.
    """

    def __init__(self) -> None:
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO among equal priorities
        self._thread = threading.Thread(target=self._run, name="device", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, priority: int, fn: Callable[[], R]) -> "Future[R]":
        fut: Future = Future()
        self._jobs.put((priority, next(self._order), fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            _, _, fn, fut = self._jobs.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # delivered to the awaiting coroutine
                fut.set_exception(exc)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put((float("inf"), next(self._order), None, None))
        self._thread.join()


class NoTranscription:
    """Stands in for Whisper when `transcribe` is off: no model is loaded, rows get no transcript.

    `name` is None: the rows' `whisper_model` column is null, and `_manifest.json` records that the
    directory was built without Whisper (so it is never mixed with a transcribed one)."""

    name = None
    device = "none"
    compute_type = "none"
    batch_size = 0
    beam_size = 0
    language = None
    window = "none"

    def close(self) -> None:
        pass


#: The VAD's name in rows and `_manifest.json`: faster-whisper's bundled Silero model (pipeline/analysis/vad.py).
VAD_MODEL = "silero_vad_v6"


class Analysis:
    """The analysis models (pipeline/analysis): Silero VAD, DNSMOS P.835 and the speaker encoder.

    Loaded once, up front, on the pipeline's device (CUDA when there is one); every call runs on the
    device thread, a whole micro-batch of clips at a time (`batch.segment_stage`, `batch.score_stage`)."""

    def __init__(self, device: str, dnsmos: bool = True) -> None:
        from .analysis.quality import DnsmosScorer
        from .analysis.speakers import SpeakerEncoder

        self.device = device
        self.vad_name = VAD_MODEL
        self.dnsmos = DnsmosScorer(device) if dnsmos else None  # None: dnsmos_* columns null (see Settings.dnsmos)
        self.speakers = SpeakerEncoder(device)

    @classmethod
    def load(cls, settings: Settings) -> "Analysis":
        device = resolve_device(settings.device)
        return cls(device, dnsmos=settings.dnsmos == "on" or (settings.dnsmos == "auto" and device == "cuda"))

    @property
    def names(self) -> dict[str, str | None]:
        """What `_manifest.json` records (and the rows' `vad_model`, `dnsmos_model`, `speaker_model`)."""
        return {"vad_model": self.vad_name, "dnsmos_model": self.dnsmos.name if self.dnsmos else None,
                "speaker_model": self.speakers.name}


class Models:
    def __init__(
        self, settings: Settings, transcriber: WhisperTranscriber | NoTranscription, tokenizer: AudioTokenizer,
        analysis: Analysis | None = None,
    ) -> None:
        self.settings = settings
        self.transcriber = transcriber
        self.tokenizer = tokenizer
        self.analysis = analysis  # None: the quality, speaker and utterance columns stay null (tests, tools)
        self.transcribes = not isinstance(transcriber, NoTranscription)
        self._device = DeviceThread()
        self._cpu = ThreadPoolExecutor(max_workers=max(1, min(4, settings.resolved_cpu_threads())), thread_name_prefix="cpu")
        self.busy_seconds = 0.0  # time the device thread spent on model work (utilisation)

    @classmethod
    def load(cls, settings: Settings) -> "Models":
        """Load both models up front: a missing checkpoint fails here, never mid-stream."""
        t = time.perf_counter()
        transcriber = WhisperTranscriber(settings) if settings.transcribe else NoTranscription()
        tokenizer = load_tokenizer(settings)
        analysis = Analysis.load(settings) if settings.analysis else None
        log.info(
            "models ready in %.1fs: whisper=%s tokenizer=%s %s device=%s",
            time.perf_counter() - t, transcriber.name or "off (transcribe=false)", tokenizer.name,
            " ".join(f"{k}={v}" for k, v in analysis.names.items()) if analysis else "analysis=off",
            transcriber.device,
        )
        return cls(settings, transcriber, tokenizer, analysis)

    @property
    def identity(self) -> dict[str, str | None]:
        """What made the rows, for `_manifest.json`: the models' names and the segmentation (an output never
        mixes file rows with utterance rows, or one model's scores with another's, unless forced)."""
        names = self.analysis.names if self.analysis is not None else {}
        return {"whisper_model": self.transcriber.name, "tokenizer": self.tokenizer.name,
                "segmentation": self.settings.segmentation, **names}

    @property
    def layouts(self) -> tuple[AudioLayout, ...]:
        """The views of each clip that decode makes in its one pass: what the loaded tokenizer reads,
        and 16 kHz mono for Whisper and the analysis models unless neither is loaded."""
        return (WHISPER_LAYOUT, self.tokenizer.layout) if self.transcribes or self.analysis else (self.tokenizer.layout,)

    async def on_device(
        self, stage: str, timings: dict[str, float], fn: Callable[..., R], *args: Any, priority: int = 0
    ) -> R:
        """Run model work on the device thread, lowest `priority` (oldest batch) first;
        `timings[stage]` gets the time it ran (not queued)."""
        fut = self._device.submit(priority, partial(self._timed, stage, timings, True, fn, *args))
        return await asyncio.wrap_future(fut)

    async def on_cpu(self, stage: str, timings: dict[str, float], fn: Callable[..., R], *args: Any) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cpu, partial(self._timed, stage, timings, False, fn, *args))

    def _timed(self, stage: str, timings: dict[str, float], device: bool, fn: Callable[..., R], *args: Any) -> R:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            took = time.perf_counter() - t
            timings[stage] = timings.get(stage, 0.0) + took
            if device:
                self.busy_seconds += took

    def close(self) -> None:
        self._device.shutdown()
        self._cpu.shutdown(wait=True)
        self.tokenizer.close()
        self.transcriber.close()
