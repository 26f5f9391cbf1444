"""The io-floor mode: the I/O and decode no stream can avoid, the stream ceiling's yardstick.

    io-floor     list the objects, download them `download_concurrency` at a time, decode each on a
                 CPU pool of the consumer's size as it arrives, with the pipeline's own decode_stage
                 (so it carries our decode costs: the views it makes)
    plain-floor  what a user would write: aiobotocore, list, 8 concurrent GETs, soundfile at the
                 native rate; the yardstick with none of our costs

Both run the same loop (`_run_floor`); only the client, the GET and the decode differ.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from pipeline.config import Settings

from .corpus import BUCKET, SMALL_PREFIX, StoredObject
from .measure import ModeResult, measured


async def _run_floor(name: str, settings: Settings, objects: list[StoredObject], client: Any, concurrency: int,
                     get: Callable[[Any, str], Awaitable[bytes]], decode: Callable[[bytes], float | None]) -> ModeResult:
    """List SMALL_PREFIX, `get` each key `concurrency` at a time, `decode` it (audio seconds, None:
    not decodable) on a CPU pool of the consumer's size as it arrives."""
    threads = max(1, min(4, settings.resolved_cpu_threads()))  # as `Models`' CPU pool
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"{name}-cpu")
    loop = asyncio.get_running_loop()
    timings = {"list": 0.0, "download": 0.0, "decode": 0.0}
    decoded = failed = 0
    audio = 0.0

    def timed_decode(data: bytes) -> float | None:
        t = time.perf_counter()
        try:
            return decode(data)
        finally:
            timings["decode"] += time.perf_counter() - t

    try:
        async with client as s3:
            with measured(name) as info:
                t0 = time.perf_counter()
                keys = []
                async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=SMALL_PREFIX):
                    keys += [o["Key"] for o in page.get("Contents", [])]
                timings["list"] = time.perf_counter() - t0
                sem = asyncio.Semaphore(concurrency)

                async def one(key: str) -> None:
                    nonlocal decoded, failed, audio
                    async with sem:
                        t = time.perf_counter()
                        data = await get(s3, key)
                        timings["download"] += time.perf_counter() - t
                    seconds = await loop.run_in_executor(pool, timed_decode, data)  # (`audio += await` would lose updates)
                    if seconds is None:
                        failed += 1
                    else:
                        decoded += 1
                        audio += seconds

                await asyncio.gather(*(one(k) for k in keys))
                wall = time.perf_counter() - t0
    finally:
        pool.shutdown(wait=True)
    if len(keys) != len(objects) or failed:
        raise RuntimeError(f"{name}: listed {len(keys)} objects for {len(objects)} uploaded, {failed} failed to decode")
    return ModeResult(name, decoded, audio, wall, **info, details={
        "events_per_second": decoded / wall, "stage_seconds": timings,
        "download_concurrency": concurrency, "decode_threads": threads,
    })


async def run_io_floor(settings: Settings, objects: list[StoredObject]) -> ModeResult:
    """Our client and `download_object`, `download_concurrency` at a time, and our `decode_stage`."""
    from pipeline.batch import Downloaded, Slot, decode_stage
    from pipeline.storage import download_object, s3_client

    st = settings

    async def get(s3: Any, key: str) -> bytes:
        data, _ = await download_object(s3, BUCKET, key, st.max_object_bytes, st.s3_retry_attempts)
        return data

    def decode(data: bytes) -> float | None:
        slot = decode_stage([Slot(None, Downloaded(data, ""))], st)[0]  # type: ignore[arg-type]
        return slot.value.duration_sec if slot.ok else None  # type: ignore[union-attr]

    return await _run_floor("io-floor", st, objects, s3_client(st), st.download_concurrency, get, decode)


async def run_plain_floor(settings: Settings, objects: list[StoredObject], concurrency: int = 8) -> ModeResult:
    """The floor a user would write without this project: aiobotocore's own client, list, `concurrency`
    GETs at a time, `soundfile.read` at the file's native rate on a thread pool of the consumer's CPU
    pool size. No 16 kHz view, no tokenizer view, no retries, no size bound: io-floor's costs less ours."""
    import io

    import soundfile as sf
    from aiobotocore.session import get_session

    async def get(s3: Any, key: str) -> bytes:
        resp = await s3.get_object(Bucket=BUCKET, Key=key)
        async with resp["Body"] as body:
            return await body.read()

    def decode(data: bytes) -> float:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32")
        return len(samples) / rate

    client = get_session().create_client("s3", **settings.s3_client_kwargs())
    return await _run_floor("plain-floor", settings, objects, client, concurrency, get, decode)
