"""Resolve `device=auto` once, the same way for Whisper and the tokenizer; tell a broken device from bad input."""

from __future__ import annotations

from functools import lru_cache

from .errors import DeviceFault


@lru_cache(maxsize=None)
def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken CUDA install: CPU it is
        return False


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    return requested


def resolve_compute_type(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    return "float16" if device == "cuda" else "int8"


# What a broken device says, in CTranslate2's, torch's and the CUDA runtime's words. Any of these
# poisons the process's CUDA context: every later call fails too, whatever the input.
_DEVICE_MARKERS = ("CUDA error", "CUDA failed", "CUDA driver", "cuDNN", "CUDNN_STATUS", "CUBLAS_STATUS", "cuBLAS",
                   "NCCL", "device-side assert", "no CUDA-capable device", "illegal memory access",
                   "misaligned address", "CUDA out of memory")


def device_fault(exc: BaseException | None) -> DeviceFault | None:
    """A `DeviceFault` when `exc` (or what it wraps) is the device failing, not the input; else None."""
    seen = 0
    while exc is not None and seen < 4:
        text = f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "OutOfMemoryError" or any(m in text for m in _DEVICE_MARKERS):
            return DeviceFault(f"the device failed: {text[:300]}")
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def is_device_oom(exc: BaseException) -> bool:
    """Device memory ran out: worth one retry at a smaller batch before calling the device broken."""
    text = f"{type(exc).__name__}: {exc}"
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text or (
        "out of memory" in text.lower() and "CUDA" in text)
