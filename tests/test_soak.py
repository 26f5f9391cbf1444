"""Soak: two consumers in one group under live events with duplicates, seeded random kill -9,
SIGSTOP past the session timeout, and graceful stops with restarts - on a local output and on an
s3:// output. Afterwards every object is one row, no offset is in two files, summary.json matches
the rows, the whole log is committed and nothing was dead-lettered.

Real broker (Tansu), real S3 (moto), real consumer processes (`FakeWhisper` children, so the
chaos, not the model, is what costs time). The schedule of faults is drawn from one seed, printed
on failure; `METAVOICE_SOAK_SEED` replays it and `METAVOICE_SOAK_SECONDS` sets the chaos period
per output kind (default 45 s). Everything is bounded: each stop waits a finite time, the drain
after the chaos has its own deadline.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from pipeline.events import ObjectEvent
from pipeline.output import open_output
from tests.conftest import read_topic
from tests.consumer_process import (
    ConsumerProcess,
    Trickle,
    assert_exactly_once,
    assert_offsets_contiguous,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    partition_ends,
    upload_copies,
    versions,
)

# Part of the suite since issue 19 item 7: with the leader-leave workaround (broker/clients.py:
# leave_group; Tansu lost a group whose leader left mid-rebalance, README Embedded defaults) 10 of
# 10 opt-in runs in a row passed, both arms each, fresh seeds, 60 s chaos per arm (3:00-3:24 per
# run on two shared cores). The default here is 45 s per arm, so both arms cost under 3 minutes.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSION_TIMEOUT_MS = 6000
SHUTDOWN_TIMEOUT_S = 30.0
# a clean exit comes within shutdown_timeout (consumer/cli.py: exit_within); this much more is the
# test's own scheduling on two shared cores, well below the stop backstop's margin
EXIT_SLACK_S = 5.0
# per output kind; both arms together cost about 2.5-3 minutes of the suite on two shared cores
CHAOS_SECONDS = float(os.environ.get("METAVOICE_SOAK_SECONDS", "45"))
DUPLICATE_SHARE = 0.2
# every arm draws each fault at least once (kill -9 twice), then at random
EVERY_FAULT = ["kill", "kill", "stop", "term"]
DRAIN_DEADLINE_S = 180.0  # the clean finish after the chaos: two fresh members join, drain, idle out


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("METAVOICE_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))


def live_events(rng: random.Random, originals: list[ObjectEvent]) -> list[ObjectEvent]:
    """`originals` in order, with about `DUPLICATE_SHARE` of the stream re-sending an event
    already sent (at-least-once producers do): duplicates must count, never become rows."""
    stream: list[ObjectEvent] = []
    for e in originals:
        stream.append(e)
        if rng.random() < DUPLICATE_SHARE / (1 - DUPLICATE_SHARE):
            stream.append(rng.choice(stream))
    return stream


@dataclass
class Slot:
    """One of the group's two members, restarted as a node would be: same spool, a new log per life."""

    name: str
    make: Callable[[str], ConsumerProcess]
    lives: int = 0
    proc: ConsumerProcess | None = None
    stopped: bool = False  # under SIGSTOP
    exits: list[tuple[str, int]] = field(default_factory=list)  # (how it was stopped, exit code)

    def start(self) -> None:
        self.lives += 1
        self.proc = self.make(f"{self.name}-{self.lives}").start()
        self.stopped = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.proc is not None and self.proc.proc.poll() is None


class Chaos:
    """Draws and applies the faults; checks every exit the faults did not cause itself."""

    def __init__(self, rng: random.Random, slots: list[Slot], journal: list[str]) -> None:
        self.rng, self.slots, self.journal = rng, slots, journal
        self.t0 = time.monotonic()
        self.planned = rng.sample(EVERY_FAULT, len(EVERY_FAULT))  # drawn first, in a seeded order

    def note(self, text: str) -> None:
        self.journal.append(f"{time.monotonic() - self.t0:6.1f}s {text}")

    def reap(self) -> None:
        """A member that exited on its own may only have been fenced (a SIGSTOP past the session
        timeout: row 19); it is restarted. Any other exit is a failure."""
        for s in self.slots:
            if s.proc is not None and not s.running and not s.stopped:
                rc = s.proc.proc.returncode
                self.note(f"{s.name} exited by itself with {rc}")
                assert rc == 1 and "Fenced" in s.proc.log(), \
                    f"{s.name} exited with {rc} by itself:\n{s.proc.log()[-4000:]}"
                s.exits.append(("fenced", rc))
                s.start()

    def act(self) -> None:
        s = self.rng.choice(self.slots)
        action = self.planned.pop() if self.planned else self.rng.choice(EVERY_FAULT)
        self.note(f"{action} {s.name} (life {s.lives})")
        if action == "kill":
            s.proc.kill()
            s.exits.append(("kill", s.proc.proc.returncode))
            s.proc = None  # down until restarted: not an exit of its own
            self.pause(self.rng.uniform(0.2, 3.0))
            s.start()
        elif action == "stop":
            s.proc.signal(signal.SIGSTOP)
            s.stopped = True
            self.pause(SESSION_TIMEOUT_MS / 1000 + self.rng.uniform(1.0, 4.0))  # past the session timeout
            s.proc.signal(signal.SIGCONT)
            s.stopped = False
        else:
            self.terminate(s)
            s.proc = None
            self.pause(self.rng.uniform(0.2, 2.0))
            s.start()

    def terminate(self, s: Slot) -> None:
        """SIGTERM is a clean stop: exit 0 within the shutdown timeout (1 if it had been fenced)."""
        t0 = time.monotonic()
        s.proc.signal(signal.SIGTERM)
        rc = s.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 30)
        took = time.monotonic() - t0
        s.exits.append(("term", rc))
        self.note(f"{s.name} exited with {rc} after SIGTERM in {took:.1f}s")
        log = s.proc.log()
        started = "models ready" in log  # logged after the signal handlers are installed
        # before its handlers exist (still importing) a SIGTERM ends it as it ends any process: harmless,
        # it had done nothing yet; once started it must drain and exit 0 (1 if it had been fenced)
        assert rc == 0 or (rc == 1 and "Fenced" in log) or (rc == -signal.SIGTERM and not started), \
            f"{s.name} answered SIGTERM with {rc}:\n{log[-4000:]}"
        assert took < SHUTDOWN_TIMEOUT_S + EXIT_SLACK_S, f"{s.name} took {took:.1f}s to stop:\n{log[-4000:]}"

    def pause(self, seconds: float) -> None:
        """Sleep in small steps, restarting any member that was fenced meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(0.2, left))
            self.reap()


def soak(services, s3, bucket, speech_corpus, settings_factory, tmp_path: Path, seed: int, output: str, **overrides) -> None:
    rng = random.Random(seed)
    st = settings_factory(
        output_dir=output, spool_dir=str(tmp_path / "spool-a"), topic_partitions=4, batch_max_events=4,
        roll_max_rows=12, roll_max_seconds=3.0, exit_when_idle=None, kafka_session_timeout_ms=SESSION_TIMEOUT_MS,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S, **overrides,
    )
    originals = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 120)
    stream = live_events(rng, originals)
    create_topics(st)
    journal: list[str] = []

    def member(spool: str):
        def make(life: str, **update) -> ConsumerProcess:
            return ConsumerProcess(services, st.model_copy(update={"spool_dir": str(tmp_path / spool), **update}),
                                   tmp_path / f"{life}.log", METAVOICE_TEST_WHISPER_DELAY="0.05")
        return make

    slots = [Slot("a", member("spool-a")), Slot("b", member("spool-b"))]
    chaos = Chaos(rng, slots, journal)
    trickle = Trickle(st, stream, interval=CHAOS_SECONDS * 0.8 / len(stream))
    finals: list[ConsumerProcess] = []
    try:
        for s in slots:
            s.start()
        trickle.start()
        while time.monotonic() - chaos.t0 < CHAOS_SECONDS:
            chaos.pause(rng.uniform(2.0, 6.0))
            chaos.act()
        sent = trickle.finish(timeout=60)
        assert len(sent) == len(stream)

        # The clean finish: both members stop gracefully, then drain what is left and exit when idle.
        chaos.reap()
        for s in slots:
            chaos.terminate(s)
        finals += [ConsumerProcess(services, st.model_copy(update={"spool_dir": str(tmp_path / f"spool-{n}"),
                                                                  "exit_when_idle": 4.0}),
                                  tmp_path / f"{n}-final.log") for n in "ab"]
        for f in finals:
            f.start()
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        codes = [f.wait(timeout=max(1.0, deadline - time.monotonic())) for f in finals]
        chaos.note(f"final members exited with {codes}")
        assert codes == [0, 0], f"the final members exited with {codes}"

        out = open_output(st.output_dir, st)
        assert_exactly_once(out, versions(originals))  # every object one row; nothing left in progress
        assert_summary_matches_files(out)
        ends = partition_ends(st, expected=len(stream))
        assert sum(ends.values()) == len(stream)
        assert_offsets_contiguous(out, ends)  # no offset in two files, none missing
        assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}
        assert read_topic(st, st.dlq_topic, expected=0, timeout=2) == [], "nothing may be dead-lettered"
    except BaseException as exc:
        logs = "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(tmp_path.glob("*.log")))
        raise AssertionError(f"soak failed with METAVOICE_SOAK_SEED={seed} ({output}): {exc!r}\n"
                             f"journal:\n" + "\n".join(journal) + f"\n{logs}") from exc
    finally:
        for p in [s.proc for s in slots if s.proc is not None] + finals:
            p.signal(signal.SIGCONT)
            p.kill()


def test_two_consumers_under_kill_stop_and_restart_keep_a_local_dataset_exactly_once(
    services, s3, bucket, speech_corpus, settings_factory, tmp_path, seed
):
    soak(services, s3, bucket, speech_corpus, settings_factory, tmp_path, seed, str(tmp_path / "out"))


def test_two_consumers_under_kill_stop_and_restart_keep_an_s3_dataset_exactly_once(
    services, s3, bucket, speech_corpus, settings_factory, tmp_path, seed, unique
):
    s3.create_bucket(Bucket=f"out-{unique}")
    # a killed writer's claim is taken over after the TTL: keep it short so the soak moves on
    soak(services, s3, bucket, speech_corpus, settings_factory, tmp_path, seed, f"s3://out-{unique}/dataset",
         output_claim_ttl_s=10.0)
