"""A real Prefect server on PostgreSQL, for the Prefect tests (this module holds no tests of its own).

- `PostgresCluster`: `initdb` into a temp directory and `pg_ctl start` on a free loopback port,
  TCP only, fsync off (a throwaway). PostgreSQL refuses to run as root, so as root the cluster
  belongs to the `postgres` system user (`apt-get install postgresql` creates it; else `nobody`).
- `PrefectServer`: `prefect server start` against that database on a free port, with its services
  (the task-run recorder turns task-run events into task runs). `stop()` is an outage - the process
  is gone, connections are refused - and `start()` brings it back on the same port and database,
  so what was recorded before is still there.
- `prefect_server`: both, once per session (import it into a test module to use it).
- Reading back what Prefect recorded goes through its REST API (`flow_runs`, `task_runs`, `logs`,
  `events`, `raw`), with httpx: the test process itself never points Prefect's settings anywhere.
- `create_deployment_run` registers deploy/prefect_flow.py's flow as a deployment and creates a
  flow run of it, as `prefect deploy` + `prefect deployment run` would; `deployment_child_main`
  executes such a run the way a process worker does (`python -m prefect.engine <id>`), with
  `FakeWhisper` installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from metavoice.local_services import LOOPBACK, ManagedProcess, free_port

REPO = Path(__file__).resolve().parent.parent


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (`initdb`, `pg_ctl`): on PATH, else Debian's versioned directory."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} not found: run scripts/install.sh (apt-get install postgresql)")
    return found


class PostgresCluster:
    def __init__(self) -> None:
        self.port = free_port()
        self.user = "prefect"
        # Not under pytest's tmp dirs: those are private to root, and the server may run as `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="metavoice-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.os_user: str | None = None
        if os.geteuid() == 0:
            self.os_user = "postgres" if _user_exists("postgres") else "nobody"
            pw = pwd.getpwnam(self.os_user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}@{LOOPBACK}:{self.port}/prefect"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        out = subprocess.run(argv, user=self.os_user, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    def start(self) -> "PostgresCluster":
        self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        options = (f"-c listen_addresses={LOOPBACK} -p {self.port} -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w", "-t", "60", "start")
        self._create_database()  # Prefect creates its tables (migrations at start-up), not the database
        return self

    def _create_database(self) -> None:
        import asyncio

        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(host=LOOPBACK, port=self.port, user=self.user, database="postgres")
            try:
                await conn.execute("CREATE DATABASE prefect")
            finally:
                await conn.close()

        asyncio.run(create())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class PrefectServer:
    def __init__(self, database_url: str, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "METAVOICE_"))}
        env.update({
            "PREFECT_HOME": str(workdir / "home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "true",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        })
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", LOOPBACK, "--port", str(self.port), "--no-ui"]
        self.process = ManagedProcess(argv, self.port, workdir / "prefect-server.log", env=env)

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api"

    @property
    def running(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def start(self, timeout: float = 90) -> "PrefectServer":
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            if not self.running:
                break
            time.sleep(0.2)
        raise RuntimeError(f"Prefect server did not become healthy:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        self.process.stop()

    def log(self) -> str:
        p = self.process.log_path
        return p.read_text(errors="replace") if p.exists() else ""

    # --- reading back what Prefect recorded -----------------------------------------------------
    def raw(self, path: str, body: dict[str, Any]) -> bytes:
        r = httpx.post(f"{self.api_url}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.content

    def _all(self, path: str, body: dict[str, Any]) -> list[dict]:
        out: list[dict] = []
        while True:
            page = httpx.post(f"{self.api_url}{path}", json={**body, "limit": 200, "offset": len(out)}, timeout=30)
            page.raise_for_status()
            rows = page.json()
            out.extend(rows)
            if len(rows) < 200:
                return out

    def flow_runs(self, since: datetime, flow_name: str | None = None) -> list[dict]:
        """Flow runs created since `since` (of the flow `flow_name`), oldest first."""
        body: dict[str, Any] = {"flow_runs": {"expected_start_time": {"after_": since.isoformat()}}, "sort": "EXPECTED_START_TIME_ASC"}
        if flow_name:
            body["flows"] = {"name": {"any_": [flow_name]}}
        return self._all("/flow_runs/filter", body)

    def task_runs(self, flow_run_ids: list[str]) -> list[dict]:
        if not flow_run_ids:
            return []
        return self._all("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": flow_run_ids}}})

    def logs(self, flow_run_ids: list[str]) -> list[dict]:
        if not flow_run_ids:
            return []
        return self._all("/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids}}})

    def events(self, since: datetime) -> bytes:
        """Every event (task-run and flow-run state changes, ...) since `since`, as the API's JSON."""
        body = {"filter": {"occurred": {"since": since.isoformat(), "until": datetime.now(timezone.utc).isoformat()}},
                "limit": 50}
        r = httpx.post(f"{self.api_url}/events/filter", json=body, timeout=30)
        r.raise_for_status()
        pages = [r.content]
        nxt = r.json().get("next_page")
        while nxt:
            r = httpx.get(nxt, timeout=30)
            r.raise_for_status()
            pages.append(r.content)
            nxt = r.json().get("next_page")
        return b"\n".join(pages)

    def flow_run(self, flow_run_id: str) -> dict:
        r = httpx.get(f"{self.api_url}/flow_runs/{flow_run_id}", timeout=30)
        r.raise_for_status()
        return r.json()

    # --- a deployment of deploy/prefect_flow.py ---------------------------------------------
    def create_deployment_run(self, name: str, parameters: dict[str, Any]) -> str:
        """deploy/prefect.yaml's shape (entrypoint, set_working_directory) registered by REST; a run of it."""
        flow = httpx.post(f"{self.api_url}/flows/", json={"name": "metavoice-stream-consumer"}, timeout=30)
        flow.raise_for_status()
        deployment = httpx.post(f"{self.api_url}/deployments/", timeout=30, json={
            "name": name,
            "flow_id": flow.json()["id"],
            "entrypoint": "deploy/prefect_flow.py:stream_consumer",
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
            "parameters": parameters,
            "enforce_parameter_schema": False,
        })
        deployment.raise_for_status()
        run = httpx.post(f"{self.api_url}/deployments/{deployment.json()['id']}/create_flow_run", json={}, timeout=30)
        run.raise_for_status()
        return run.json()["id"]


def deployment_child_main() -> None:
    """`python -m prefect.engine <flow run id>` (what a process worker runs) with FakeWhisper installed."""
    import runpy

    import pipeline.models
    from tests.consumer_process import FakeWhisper

    pipeline.models.WhisperTranscriber = FakeWhisper  # type: ignore[misc,assignment]
    sys.argv = ["prefect.engine", *sys.argv[1:]]
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server on its own PostgreSQL cluster, once per session; running when a test starts."""
    pg = PostgresCluster().start()
    try:
        server = PrefectServer(pg.url, tmp_path_factory.mktemp("prefect-server")).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        pg.stop()
