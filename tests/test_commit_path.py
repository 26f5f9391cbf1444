"""The one way offsets reach the broker (consumer/committer.py), and patience with faults that are
not about any object (consumer/environment.py): unit rules, with a stand-in consumer."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import CommitFailedError
from aiokafka.structs import TopicPartition

import consumer.environment
from consumer.committer import OutputCommitter
from consumer.environment import FaultWatch
from pipeline.errors import FatalError, StorageOutage
from pipeline.ledger import OutputLedger
from pipeline.parquet import RollingParquetWriter

A, B, C = TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("t", 2)


class Broker:
    """The part of AIOKafkaConsumer the committer uses: what is assigned, and commits."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.committed: dict[TopicPartition, int] = {}
        self.refuse = 0  # the next n commits fail (a rebalance in between)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets) -> None:
        if self.refuse:
            self.refuse -= 1
            raise CommitFailedError("the group rebalanced")
        self.committed.update({tp: meta.offset for tp, meta in offsets.items()})


@pytest.fixture
def committer(tmp_path):
    broker = Broker({A, B})
    writer = RollingParquetWriter(tmp_path, roll_max_rows=10, roll_max_seconds=60)
    yield OutputCommitter(broker, writer, OutputLedger(tmp_path), None), broker  # type: ignore[arg-type]
    writer.close()


async def test_a_files_offsets_are_committed_for_assigned_partitions_only_and_counted(committer):
    c, broker = committer
    c._to_commit = {A: 5, C: 9}  # noqa: SLF001  (what apply() gathered; C was revoked meanwhile)
    await c.commit()
    assert broker.committed == {A: 5} and c.stats.commits == 1
    await c.commit()  # nothing new: no commit
    assert c.stats.commits == 1


async def test_a_failed_commit_is_logged_not_raised_nor_counted_and_the_next_file_commits_past_it(committer, caplog):
    c, broker = committer
    broker.refuse = 1
    c._to_commit = {A: 5}  # noqa: SLF001
    await c.commit()
    assert broker.committed == {} and c.stats.commits == 0
    assert "offset commit failed" in caplog.text
    c._to_commit = {A: 8}  # noqa: SLF001
    await c.commit()
    assert broker.committed == {A: 8} and c.stats.commits == 1


async def test_a_files_commit_never_moves_back_but_a_rewind_may(committer):
    c, broker = committer
    c._to_commit = {A: 7}  # noqa: SLF001
    await c.commit()
    c._to_commit = {A: 6}  # noqa: SLF001
    with pytest.raises(AssertionError, match="below 7"):
        await c.commit()
    await c.commit_rewind({A: 0, C: 0})
    assert broker.committed == {A: 0}  # C is not assigned
    c._to_commit = {A: 2}  # noqa: SLF001
    await c.commit()  # from the rewind on, commits go forward from it
    assert broker.committed == {A: 2}


async def test_recovered_offsets_are_committed_only_where_ahead_of_what_this_process_committed(committer):
    c, broker = committer
    c._to_commit = {A: 7}  # noqa: SLF001
    await c.commit()
    await c.commit_recovered({A: 5, B: 4, C: 3})
    assert broker.committed == {A: 7, B: 4}  # A: already past 5; C: not assigned
    assert c.stats.commits == 1  # recovered offsets are not a file's commit


async def test_after_an_abort_a_files_offsets_are_never_committed(committer):
    c, broker = committer
    c._to_commit = {A: 5}  # noqa: SLF001
    c.abort()
    with pytest.raises(FatalError):
        await c.commit()
    assert broker.committed == {}


# --- patience with the environment -----------------------------------------------------------------
async def test_a_fault_not_about_any_object_is_retried_with_backoff_until_it_passes(monkeypatch):
    monkeypatch.setattr(consumer.environment, "BACKOFF_FIRST_S", 0.01)
    watch = FaultWatch(timeout_s=60)
    results = [StorageOutage("down"), StorageOutage("still down"), "done"]

    async def attempt():
        r = results.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    assert await watch.patiently(attempt, asyncio.Event()) == "done"
    assert watch.counts == {"storage_outage": 2} and watch.current is None


async def test_a_stop_while_waiting_out_a_fault_raises_it_at_once():
    watch = FaultWatch(timeout_s=60)
    stop = asyncio.Event()

    async def attempt():
        stop.set()  # a SIGTERM arrives while the batch is faulting
        raise StorageOutage("down")

    with pytest.raises(StorageOutage):
        await asyncio.wait_for(watch.patiently(attempt, stop), timeout=5)  # not the 1 s backoff, let alone 60 s


async def test_a_fault_that_outlasts_the_timeout_is_raised():
    watch = FaultWatch(timeout_s=0)

    async def attempt():
        raise StorageOutage("down for good")

    with pytest.raises(StorageOutage, match="for good"):
        await watch.patiently(attempt, asyncio.Event())
