"""Measurement helpers: RSS sampling, CPU by process, one mode's result, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Iterator

import numpy as np

log = logging.getLogger("benchmark")

SAMPLE_EVERY_S = 0.1
MB = 1024 * 1024


class BenchWaitTimeout(RuntimeError):
    """A wait inside the benchmark ran out; the message names what it waited for."""


def psutil_module():
    try:
        import psutil
    except ImportError as exc:  # pragma: no cover - dev extra
        raise SystemExit("the benchmark needs psutil: pip install -e '.[dev]'") from exc
    return psutil


class RssSampler:
    """Samples this process's RSS on a thread; `peak` and `series` (seconds, MB) when stopped."""

    def __init__(self, every: float = SAMPLE_EVERY_S) -> None:
        self.every = every
        self.proc = psutil_module().Process()
        self.series: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.series.append((time.perf_counter() - self.t0, self.proc.memory_info().rss / MB))
            self._stop.wait(self.every)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.series.append((time.perf_counter() - self.t0, self.proc.memory_info().rss / MB))

    @property
    def peak(self) -> float:
        return max(v for _, v in self.series)


def _child_kind(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "moto" in text:
        return "s3 (moto)"
    if "tansu" in text or "broker" in text:
        return "kafka (tansu)"
    if "prefect" in text or "uvicorn" in text:
        return "prefect server"
    return "other"


def _cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far: this process, and its children grouped by what they are."""
    psutil = psutil_module()
    me = psutil.Process()
    t = me.cpu_times()
    out = {"bench process": t.user + t.system}
    sys_t = psutil.cpu_times()
    out["machine (all processes)"] = sum(getattr(sys_t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            ct = child.cpu_times()
            kind = _child_kind(child.cmdline())
            out[kind] = out.get(kind, 0.0) + ct.user + ct.system
    return out


@dataclass
class ModeResult:
    name: str
    files: int
    audio_seconds: float
    wall_seconds: float
    peak_rss_mb: float
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before, after
    word_overlap: float | None = None  # transcripts vs the spoken text (a sanity check, not WER)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def cpu_efficiency(self) -> float | None:
        """Audio-seconds per CPU-second of this run's own processes (bench, broker, S3, Prefect):
        less sensitive than wall time to other work on a shared machine."""
        ours = sum(v for k, v in self.cpu_seconds.items() if k != "other processes")
        return self.audio_seconds / ours if ours > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput"] = round(self.throughput, 3)
        d["audio_s_per_cpu_s"] = round(self.cpu_efficiency, 3) if self.cpu_efficiency else None
        return rounded(d)


@contextlib.contextmanager
def measured(name: str) -> Iterator[dict[str, Any]]:
    """Peak RSS, CPU by process and load average around one mode; fills the yielded dict."""
    info: dict[str, Any] = {}
    cpu0 = _cpu_snapshot()
    load0 = os.getloadavg()[0]
    log.info("mode %s: starting (load average %.2f)", name, load0)
    with RssSampler() as rss:
        yield info
    cpu1 = _cpu_snapshot()
    info["peak_rss_mb"] = rss.peak
    cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
    machine = cpu.pop("machine (all processes)")
    # CPU that processes outside this benchmark took meanwhile: the noise on a shared machine
    cpu["other processes"] = max(0.0, machine - sum(cpu.values()))
    info["cpu_seconds"] = cpu
    info["load_average"] = (load0, os.getloadavg()[0])


def rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None



def per_thousand(count: float, events: int) -> float | None:
    return 1000.0 * count / events if events else None


# --- bounded waits: every wait names what it waits for --------------------------------------
async def wait_for(what: str, ready: Callable[[], bool] | asyncio.Event, timeout: float,
                   worker: asyncio.Task | None = None, poll: float = 0.05) -> None:
    """Wait until `ready` (a predicate or an event), at most `timeout` seconds.

    Raises `BenchWaitTimeout` naming `what` when the time runs out, and - when `worker` (e.g. the
    consumer's task) ends first - its exception, or a `BenchWaitTimeout` saying it stopped before.
    """
    check = ready.is_set if isinstance(ready, asyncio.Event) else ready
    deadline = time.monotonic() + timeout
    while not check():
        if worker is not None and worker.done():
            if not worker.cancelled() and worker.exception() is not None:
                raise worker.exception()  # type: ignore[misc]
            if check():
                return
            raise BenchWaitTimeout(f"the consumer stopped while waiting for {what}")
        if time.monotonic() > deadline:
            raise BenchWaitTimeout(f"waited {timeout:g}s for {what}")
        await asyncio.sleep(poll)


async def bounded(what: str, aw: Awaitable[Any], timeout: float) -> Any:
    """`await aw`, at most `timeout` seconds; a timeout names `what`."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        raise BenchWaitTimeout(f"waited {timeout:g}s for {what}") from None


def machine_info() -> dict[str, Any]:
    psutil = psutil_module()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        for k in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Hypervisor vendor", "L3 cache"):
            if k in fields:
                info[f"lscpu {k}"] = fields[k].strip()
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("torch", "ctranslate2", "faster-whisper", "aiokafka", "prefect", "pyarrow", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            info[dist] = version(dist)  # read from metadata: importing Prefect here would fix its settings early
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info

