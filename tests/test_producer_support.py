"""Helpers shared by the producer tests (this module holds no tests of its own).

Topics are read with a plain consumer from the earliest offset until the expected number of
records arrived (then a short settle to catch extras): the embedded broker's ListOffsets
"latest" is wrong for multi-record batches, so end offsets are never trusted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterator

import orjson
import pytest
from aiokafka import AIOKafkaConsumer


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """`main()` points the root logger at the (captured) stderr of its test; put it back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def read_topic(
    bootstrap: str, topic: str, expected: int, timeout: float = 15.0, settle: float = 0.3
) -> list[dict[str, Any]]:
    """Every record of `topic` (value parsed as JSON, plus `_key`), waiting for `expected` of them."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            if len(records) >= expected:
                settle_until = settle_until or time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
            batch = await consumer.getmany(timeout_ms=100)
            for messages in batch.values():
                for m in messages:
                    doc = orjson.loads(m.value)
                    doc["_key"] = m.key.decode() if m.key else None
                    records.append(doc)
    finally:
        await consumer.stop()
    return records


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
