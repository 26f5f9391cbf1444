"""`encodec`, `dac` and `mimi`: neural audio codecs from `transformers`, as audio tokenizers.

    METAVOICE_TOKENIZER=encodec   facebook/encodec_24khz at 6 kbps: 8 codebooks x 75 Hz (MetaVoice's tokens)
    METAVOICE_TOKENIZER=dac       descript/dac_24khz, all 32 codebooks x 75 Hz
    METAVOICE_TOKENIZER=mimi      kyutai/mimi, 8 codebooks x 12.5 Hz (as Moshi uses it)
    METAVOICE_TOKENIZER=encodec:facebook/encodec_24khz@12kbps   a full name, as the Parquet column records it

How a batch of clips becomes codes:
1. Read each clip in the codec's rate and channels (`layout`; mono for the 24 kHz codecs): the view
   decode made with soxr in its single pass over the file.
2. Zero-pad it to whole frames: frames = ceil(samples / hop), so the last, partial frame is coded
   from the clip followed by silence whatever the clip's batch-mates are.
3. Cut clips longer than `tokenizer_window_sec` into hop-aligned windows that carry
   `tokenizer_context_sec` of context (before the window; after it too for DAC, which is not causal).
   Device memory is bounded by `tokenizer_batch_size` x (window + context) samples, whatever the
   file's length.
4. Encode windows in batches of `tokenizer_batch_size`: zero-padded to the longest for the causal
   codecs (EnCodec, Mimi: trailing zeros cannot reach earlier frames), of equal length for DAC
   (its convolutions look ahead, so padding would change a clip's last frames).
5. Drop context and padding frames, join each clip's windows, return int16 `[codebooks, frames]`.

So a clip's codes never depend on its batch-mates (a replay gives identical tokens), and a clip
shorter than one window gets exactly what `model.encode` gives for it padded to whole frames. A
longer clip gets exactly the one-pass codes from DAC (context covers its receptive field) and Mimi
(encoded in streaming mode, state carried from window to window); EnCodec's LSTM remembers the whole
file, so after each window boundary a few codes may differ from one pass (see docs/tokenizers.md).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..audio import DecodedAudio
from ..config import Settings
from ..device import resolve_device
from ..errors import ModelUnavailable, TokenizationFailed
from . import register
from .base import AudioTokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SPEC = re.compile(r"^(?:(?P<kbps>\d+(?:\.\d+)?)kbps|(?P<cb>\d+)cb)$")


# --- names --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerName:
    """`family[:checkpoint[@spec]]`, as `METAVOICE_TOKENIZER` and the Parquet `tokenizer` column say it.

    `spec` is `6kbps` (EnCodec bandwidth) or `8cb` (codebooks); when present it takes the place of
    `tokenizer_bandwidth` / `tokenizer_codebooks`, so a column value reproduces its tokens.
    """

    family: str
    checkpoint: str | None = None
    bandwidth: float | None = None
    codebooks: int | None = None

    @classmethod
    def parse(cls, text: str) -> "TokenizerName":
        family, _, checkpoint = text.strip().partition(":")
        bandwidth = codebooks = None
        head, at, tail = checkpoint.rpartition("@")
        spec = _SPEC.match(tail) if at else None
        if spec:  # "@" followed by anything else is part of a path
            checkpoint = head
            if spec["kbps"]:
                bandwidth = float(spec["kbps"])
            else:
                codebooks = int(spec["cb"])
        return cls(family, checkpoint or None, bandwidth, codebooks)


# --- weights ------------------------------------------------------------------------------------


def hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in {"1", "true", "yes", "on"} for f in flags) or bool(constants.HF_HUB_OFFLINE)


def _is_local(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything that exists, or looks like a path, is a directory.
    return Path(source).expanduser().exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].rstrip(". ") if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _unavailable(family: str, source: str, download_id: str, reason: str) -> ModelUnavailable:
    """Where the weights were looked for, and how to provide them."""
    from huggingface_hub import constants

    if _is_local(source):
        where = f"the local directory {str(Path(source).expanduser().resolve())!r}"
    elif hub_offline():
        where = f"hub id {source!r} in the cache {constants.HF_HUB_CACHE!r} only (HF_HUB_OFFLINE=1)"
    else:
        where = f"hub id {source!r} in the cache {constants.HF_HUB_CACHE!r}, then on the hub (HF_HUB_OFFLINE unset)"
    return ModelUnavailable(
        f"cannot load the {family} codec: {reason}. Looked for {where}. Provide the weights with "
        f"METAVOICE_TOKENIZER_WEIGHTS=/path/to/dir (a directory holding config.json and the weights, e.g. "
        f"made by `hf download {download_id} --local-dir /path/to/dir`, or `huggingface-cli download` on "
        f"older huggingface_hub), or fill the cache with `hf download {download_id}` where the network "
        f"reaches the hub and run with HF_HUB_OFFLINE=1."
    )


def _load_model(
    family: str, model_type: str, model_class: str, source: str, download_id: str, dtype: torch.dtype
) -> Any:
    """Config and weights from a local directory or the hub (cache); every failure is a `ModelUnavailable`."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelUnavailable(
            f"the {family} codec needs transformers: pip install 'metavoice-stream[consumer,codec]' ({exc})"
        ) from exc
    if _is_local(source) and not Path(source).expanduser().is_dir():
        raise _unavailable(family, source, download_id, "no such directory")
    path = str(Path(source).expanduser()) if _is_local(source) else source
    offline = hub_offline()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=offline)
    except Exception as exc:  # OSError, hub errors, bad JSON: all mean "no usable weights here"
        raise _unavailable(family, source, download_id, _first_line(exc)) from exc
    if config.model_type != model_type:
        raise ModelUnavailable(
            f"the weights at {source!r} are a {config.model_type!r} model, not {model_type!r}: set "
            f"METAVOICE_TOKENIZER to the matching codec, or METAVOICE_TOKENIZER_WEIGHTS to {family} weights"
        )
    try:
        model = getattr(transformers, model_class).from_pretrained(
            path, config=config, dtype=dtype, local_files_only=offline
        )
    except Exception as exc:
        raise _unavailable(family, source, download_id, _first_line(exc)) from exc
    return model.eval()


# --- windows ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Span:
    """Frames [start, stop) of a clip go through the model; [keep_from, keep_to) of those are kept."""

    start: int
    stop: int
    keep_from: int
    keep_to: int

    @property
    def frames(self) -> int:
        return self.stop - self.start


def _spans(frames: int, window: int, left: int, right: int) -> list[_Span]:
    """Hop-aligned windows of `window` frames covering `frames`, each with up to left/right context."""
    if frames <= window:
        return [_Span(0, frames, 0, frames)] if frames else []
    spans = []
    for core in range(0, frames, window):
        core_end = min(core + window, frames)
        start, stop = max(0, core - left), min(frames, core_end + right)
        spans.append(_Span(start, stop, core - start, core_end - start))
    return spans


# --- the tokenizer ------------------------------------------------------------------------------


class CodecTokenizer(AudioTokenizer):
    """Shared by the three codecs: loading, resampling, windows, batching, decoding."""

    family: ClassVar[str]
    model_type: ClassVar[str]
    model_class: ClassVar[str]
    default_checkpoint: ClassVar[str]
    causal: ClassVar[bool] = True

    def __init__(self, settings: Settings) -> None:
        self._closed = False
        spec = TokenizerName.parse(settings.tokenizer)
        if spec.family != self.family:
            raise ValueError(f"{type(self).__name__} cannot serve tokenizer {settings.tokenizer!r}")
        # The name records what the weights are (the checkpoint in METAVOICE_TOKENIZER, else where they
        # were loaded from); METAVOICE_TOKENIZER_WEIGHTS says where they are.
        self.checkpoint = spec.checkpoint or settings.tokenizer_weights or self.default_checkpoint
        source = settings.tokenizer_weights or spec.checkpoint or self.default_checkpoint
        download_id = self.checkpoint if not _is_local(self.checkpoint) else self.default_checkpoint
        self.device = resolve_device(settings.device)
        self.dtype = _DTYPES[settings.tokenizer_dtype]
        self.batch_size = settings.tokenizer_batch_size
        self.model = _load_model(
            self.family, self.model_type, self.model_class, source, download_id, self.dtype
        )

        config = self.model.config
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(getattr(config, "audio_channels", 1))
        self.hop = self._hop(config)
        self.frame_rate = self.sample_rate / self.hop
        if int(config.codebook_size) > np.iinfo(np.int16).max + 1:
            raise ModelUnavailable(f"{source!r}: codebooks of {config.codebook_size} entries overflow int16")
        self.codebooks, label = self._choose_codebooks(settings, spec)
        self.name = f"{self.family}:{self.checkpoint}@{label}"

        self.window_frames = max(1, round(settings.tokenizer_window_sec * self.frame_rate))
        context_sec = settings.tokenizer_context_sec
        if context_sec is None:
            context_sec = self._default_context_sec(config)
        self.context_frames = math.ceil(context_sec * self.frame_rate)

        try:
            self.model.to(self.device)
            silence = torch.zeros(1, self.channels, self.hop)
            self._encode_padded(silence, torch.ones(silence.shape, dtype=torch.bool))
        except Exception as exc:  # e.g. no CUDA, or a dtype the device cannot run
            raise ModelUnavailable(
                f"{self.name} does not run on {self.device} in {settings.tokenizer_dtype}: {_first_line(exc)}"
            ) from exc
        log.info(
            "audio tokenizer %s: %d codebooks x %g Hz on %s (%s), windows of %d frames + %d context",
            self.name, self.codebooks, self.frame_rate, self.device, settings.tokenizer_dtype,
            self.window_frames, self.context_frames,
        )

    # --- what each codec defines --------------------------------------------------------------

    def _hop(self, config: Any) -> int:
        return int(config.hop_length)

    def _default_context_sec(self, config: Any) -> float:
        raise NotImplementedError

    def _choose_codebooks(self, settings: Settings, spec: TokenizerName) -> tuple[int, str]:
        """Codebooks per frame and the `@...` label of the name; a bad choice fails at start-up."""
        raise NotImplementedError

    def _encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, channels, samples] -> codes [B, codebooks, frames] (long)."""
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [1, codebooks, frames] -> audio [1, channels, samples]."""
        raise NotImplementedError

    # --- encode -------------------------------------------------------------------------------

    def encode_batch(self, clips: list[DecodedAudio]) -> list[np.ndarray]:
        if self._closed:
            raise RuntimeError(f"tokenizer {self.name} is closed")
        if not clips:
            return []
        try:
            waves = [self._prepare(c) for c in clips]
            return self._encode_waves(waves)
        except TokenizationFailed:
            raise
        except Exception as exc:  # a model error, out of memory: the caller retries clip by clip
            raise TokenizationFailed(f"{self.name} failed on {len(clips)} clip(s): {_first_line(exc)}") from exc

    def _prepare(self, clip: DecodedAudio) -> np.ndarray:
        """Step 1 and 2: the clip at the codec's rate and channels, zero-padded to whole frames."""
        samples = clip.view(self.layout)  # [frames], or [frames, channels] for a multi-channel codec
        if not np.isfinite(samples).all():
            raise TokenizationFailed("audio holds NaN or infinite samples")
        wave = samples[None, :] if samples.ndim == 1 else samples.T
        frames = math.ceil(wave.shape[1] / self.hop)
        padded = np.zeros((self.channels, frames * self.hop), dtype=np.float32)
        padded[:, : wave.shape[1]] = wave
        return padded

    def _encode_waves(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Steps 3 to 5 for codecs encoded window by window with context."""
        right = 0 if self.causal else self.context_frames
        jobs = [
            (i, span)
            for i, wave in enumerate(waves)
            for span in _spans(wave.shape[1] // self.hop, self.window_frames, self.context_frames, right)
        ]
        pieces: dict[int, np.ndarray] = {}
        for group in self._groups(jobs):
            spans = [jobs[j][1] for j in group]
            segments = [waves[jobs[j][0]][:, s.start * self.hop : s.stop * self.hop] for j, s in zip(group, spans)]
            for j, span, codes in zip(group, spans, self._encode_segments(segments)):
                pieces[j] = codes[:, span.keep_from : span.keep_to]
        out: list[list[np.ndarray]] = [[] for _ in waves]
        for j, (i, _) in enumerate(jobs):
            out[i].append(pieces[j])
        empty = np.zeros((self.codebooks, 0), dtype=np.int16)
        return [np.ascontiguousarray(np.concatenate(p, axis=1)) if p else empty for p in out]

    def _groups(self, jobs: list[tuple[int, _Span]]) -> list[list[int]]:
        """Batches of job indices: longest first; equal lengths only when the codec looks ahead."""
        order = sorted(range(len(jobs)), key=lambda j: -jobs[j][1].frames)
        if self.causal:
            runs = [order]
        else:
            runs = [list(run) for _, run in groupby(order, key=lambda j: jobs[j][1].frames)]
        return [run[k : k + self.batch_size] for run in runs for k in range(0, len(run), self.batch_size)]

    def _encode_segments(self, segments: list[np.ndarray]) -> list[np.ndarray]:
        """Whole-frame segments -> int16 codes [codebooks, segment frames] each, in one model call."""
        frames = [s.shape[1] // self.hop for s in segments]
        longest = max(frames)
        x = torch.zeros(len(segments), self.channels, longest * self.hop)
        mask = torch.zeros(x.shape, dtype=torch.bool)
        for b, s in enumerate(segments):
            x[b, :, : s.shape[1]] = torch.from_numpy(s)
            mask[b, :, : s.shape[1]] = True
        codes = self._encode_padded(x, mask)
        return [codes[b, :, :f] for b, f in enumerate(frames)]

    def _encode_padded(self, x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            codes = self._encode(x.to(self.device, self.dtype), mask.to(self.device))
        frames = x.shape[-1] // self.hop
        if codes.shape[1] != self.codebooks or codes.shape[2] < frames:
            raise RuntimeError(f"model returned codes {tuple(codes.shape)} for {frames} frames")
        return codes.to(torch.int16).cpu().numpy()

    # --- decode -------------------------------------------------------------------------------

    def decode(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        """Audio [samples] (or [samples, channels]) at the codec's rate: frames x hop samples."""
        if self._closed:
            raise RuntimeError(f"tokenizer {self.name} is closed")
        codes = np.asarray(tokens)
        if codes.ndim != 2 or codes.shape[0] != self.codebooks:
            raise ValueError(f"{self.name} decodes [{self.codebooks}, frames] codes, got shape {codes.shape}")
        frames = codes.shape[1]
        right = 0 if self.causal else self.context_frames
        audio = np.zeros((self.channels, frames * self.hop), dtype=np.float32)
        for span in _spans(frames, self.window_frames, self.context_frames, right):
            c = torch.from_numpy(codes[:, span.start : span.stop].astype(np.int64))[None].to(self.device)
            with torch.inference_mode():
                piece = self._decode(c)[0].float().cpu().numpy()
            need = span.frames * self.hop
            if piece.shape[1] < need:  # DAC's odd-stride layers end a few samples short
                piece = np.pad(piece, ((0, 0), (0, need - piece.shape[1])))
            a, b = span.keep_from * self.hop, span.keep_to * self.hop
            audio[:, span.start * self.hop + a : span.start * self.hop + b] = piece[:, a:b]
        return (audio[0] if self.channels == 1 else audio.T), self.sample_rate

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


class EncodecTokenizer(CodecTokenizer):
    family = "encodec"
    model_type = "encodec"
    model_class = "EncodecModel"
    default_checkpoint = "facebook/encodec_24khz"

    def _choose_codebooks(self, settings: Settings, spec: TokenizerName) -> tuple[int, str]:
        config = self.model.config
        if config.chunk_length_s is not None or config.normalize:
            raise ModelUnavailable(
                f"{self.checkpoint!r} encodes in normalised chunks (like facebook/encodec_48khz): its codes "
                "cannot be decoded without per-chunk scales, which the dataset does not keep. Use "
                "facebook/encodec_24khz, or the dac / mimi codecs."
            )
        quantizer = self.model.quantizer
        bandwidths = [float(b) for b in config.target_bandwidths]
        supported = {b: quantizer.get_num_quantizers_for_bandwidth(b) for b in bandwidths}
        choices = ", ".join(f"{b:g} kbps = {n} codebooks" for b, n in supported.items())
        codebooks = spec.codebooks or (None if spec.bandwidth else settings.tokenizer_codebooks or None)
        if codebooks is not None:
            matches = [b for b, n in supported.items() if n == codebooks]
            if not matches:
                raise ModelUnavailable(f"{self.checkpoint!r} cannot code {codebooks} codebooks: {choices}")
            bandwidth = matches[0]
        else:
            bandwidth = float(spec.bandwidth or settings.tokenizer_bandwidth)
            if bandwidth not in supported:
                raise ModelUnavailable(f"{self.checkpoint!r} has no {bandwidth:g} kbps bandwidth: {choices}")
        self.bandwidth = bandwidth
        return supported[bandwidth], f"{bandwidth:g}kbps"

    def _default_context_sec(self, config: Any) -> float:
        # Convolutions see ~0.1 s back; the LSTM remembers everything, but the model was trained on
        # 1 s excerpts, so 1 s of context brings a window's codes close to the one-pass ones.
        return 1.0

    def _encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(x, padding_mask=mask, bandwidth=self.bandwidth, return_dict=True)
        return out.audio_codes[0]  # one chunk: [B, codebooks, frames]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes[None], [None], return_dict=True).audio_values


class DacTokenizer(CodecTokenizer):
    family = "dac"
    model_type = "dac"
    model_class = "DacModel"
    default_checkpoint = "descript/dac_24khz"
    causal = False  # symmetric convolutions: a frame also sees the audio after it

    def _choose_codebooks(self, settings: Settings, spec: TokenizerName) -> tuple[int, str]:
        most = int(self.model.config.n_codebooks)
        codebooks = spec.codebooks or settings.tokenizer_codebooks or most
        if spec.bandwidth is not None or not 1 <= codebooks <= most:
            raise ModelUnavailable(
                f"{self.checkpoint!r} codes 1 to {most} codebooks, not {codebooks} (METAVOICE_TOKENIZER_CODEBOOKS)"
            )
        return codebooks, f"{codebooks}cb"

    def _default_context_sec(self, config: Any) -> float:
        # The encoder's receptive field reaches ~0.1 s each way (dilated 7-tap convolutions at every
        # scale); 0.5 s on both sides makes windowed codes equal the one-pass ones.
        return 0.5

    def _encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x, n_quantizers=self.codebooks, return_dict=True).audio_codes

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(audio_codes=codes, return_dict=True).audio_values[:, None, :]


class MimiTokenizer(CodecTokenizer):
    family = "mimi"
    model_type = "mimi"
    model_class = "MimiModel"
    default_checkpoint = "kyutai/mimi"
    default_codebooks = 8  # what Moshi models; kyutai/mimi has 32

    def _hop(self, config: Any) -> int:
        return int(config.frame_size)  # encoder strides x the final 2x downsampling: 1920 at 24 kHz

    def _choose_codebooks(self, settings: Settings, spec: TokenizerName) -> tuple[int, str]:
        config = self.model.config
        most, least = int(config.num_quantizers), int(config.num_semantic_quantizers)
        codebooks = spec.codebooks or settings.tokenizer_codebooks or min(self.default_codebooks, most)
        if spec.bandwidth is not None or not least <= codebooks <= most:
            raise ModelUnavailable(
                f"{self.checkpoint!r} codes {least} to {most} codebooks, not {codebooks} "
                "(METAVOICE_TOKENIZER_CODEBOOKS)"
            )
        return codebooks, f"{codebooks}cb"

    def _default_context_sec(self, config: Any) -> float:
        # Only decoding uses it (encoding streams). Each transformer layer attends `sliding_window`
        # steps back, so the stack reaches layers x window (80 s for kyutai/mimi); the convolutions
        # add a few frames more.
        reach = config.num_hidden_layers * config.sliding_window / config.encodec_frame_rate
        return float(reach) + 4 / float(config.frame_rate)

    def _encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x, padding_mask=mask, num_quantizers=self.codebooks).audio_codes

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes).audio_values

    def _encode_waves(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Steps 3 to 5 by streaming: clips longest first, in batches, fed window by window with the
        convolution and attention caches carried over, so windowed codes equal one pass exactly."""
        order = sorted(range(len(waves)), key=lambda i: -waves[i].shape[1])
        out = [np.zeros((self.codebooks, 0), np.int16) for _ in waves]
        for k in range(0, len(order), self.batch_size):
            group = [waves[i] for i in order[k : k + self.batch_size]]
            codes = self._stream(group)
            for b, i in enumerate(order[k : k + self.batch_size]):
                out[i] = np.ascontiguousarray(codes[b, :, : waves[i].shape[1] // self.hop])
        return out

    def _stream(self, group: list[np.ndarray]) -> np.ndarray:
        """Codes [B, codebooks, frames of the longest] for whole-frame waves, one window at a time."""
        total = max(w.shape[1] for w in group)
        if total == 0:
            return np.zeros((len(group), self.codebooks, 0), np.int16)
        step = self.window_frames * self.hop
        if total <= step:  # one window: a plain, batched call
            return self._encode_padded(*self._window(group, 0, total))
        encoder_cache = padding_cache = None
        chunks = []
        for start in range(0, total, step):
            x, _ = self._window(group, start, min(start + step, total))
            with torch.inference_mode():
                result = self.model.encode(
                    x.to(self.device, self.dtype),
                    num_quantizers=self.codebooks,
                    encoder_cache=encoder_cache,
                    padding_cache=padding_cache,
                    use_streaming=True,
                )
            encoder_cache, padding_cache = result.encoder_cache, result.padding_cache
            chunks.append(result.audio_codes)
        codes = torch.cat(chunks, dim=-1)
        if codes.shape[1] != self.codebooks or codes.shape[2] < total // self.hop:
            raise RuntimeError(f"streaming returned codes {tuple(codes.shape)} for {total // self.hop} frames")
        return codes.to(torch.int16).cpu().numpy()

    def _window(self, group: list[np.ndarray], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [start, stop) of every wave, zero-padded past its end, and where it has audio."""
        x = torch.zeros(len(group), self.channels, stop - start)
        mask = torch.zeros(x.shape, dtype=torch.bool)
        for b, wave in enumerate(group):
            part = wave[:, start:stop]
            x[b, :, : part.shape[1]] = torch.from_numpy(part)
            mask[b, :, : part.shape[1]] = True
        return x, mask


@register("encodec")
def _build_encodec(settings: Settings) -> AudioTokenizer:
    return EncodecTokenizer(settings)


@register("dac")
def _build_dac(settings: Settings) -> AudioTokenizer:
    return DacTokenizer(settings)


@register("mimi")
def _build_mimi(settings: Settings) -> AudioTokenizer:
    return MimiTokenizer(settings)
