"""The io-floor mode: the I/O and decode no stream can avoid, the stream ceiling's yardstick.

    io-floor     list the objects, download them `download_concurrency` at a time, decode each on a
                 CPU pool of the consumer's size as it arrives, with the pipeline's own decode_stage
                 (so it carries our decode costs: the views it makes)
    plain-floor  what a user would write: aiobotocore, list, 8 concurrent GETs, soundfile at the
                 native rate; the yardstick with none of our costs
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.config import Settings

from .corpus import BUCKET, SMALL_PREFIX, StoredObject
from .measure import ModeResult, measured


async def run_io_floor(settings: Settings, objects: list[StoredObject]) -> ModeResult:
    """List SMALL_PREFIX, download `download_concurrency` at a time, decode on the CPU pool as they arrive."""
    from pipeline.batch import Downloaded, Slot, decode_stage
    from pipeline.storage import download_object, s3_client

    st = settings
    threads = max(1, min(4, st.resolved_cpu_threads()))  # as `Models`' CPU pool
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="floor-cpu")
    loop = asyncio.get_running_loop()
    timings = {"list": 0.0, "download": 0.0, "decode": 0.0}
    decoded = failed = 0
    audio = 0.0
    try:
        async with s3_client(st) as s3:
            with measured("io-floor") as info:
                t0 = time.perf_counter()
                keys = []
                async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=SMALL_PREFIX):
                    keys += [o["Key"] for o in page.get("Contents", [])]
                timings["list"] = time.perf_counter() - t0
                sem = asyncio.Semaphore(st.download_concurrency)

                def decode(data: bytes):
                    t = time.perf_counter()
                    try:
                        return decode_stage([Slot(None, Downloaded(data, ""))], st)[0]  # type: ignore[arg-type]
                    finally:
                        timings["decode"] += time.perf_counter() - t

                async def one(key: str) -> None:
                    nonlocal decoded, failed, audio
                    async with sem:
                        t = time.perf_counter()
                        data, _ = await download_object(s3, BUCKET, key, st.max_object_bytes, st.s3_retry_attempts)
                        timings["download"] += time.perf_counter() - t
                    slot = await loop.run_in_executor(pool, decode, data)
                    if slot.ok:
                        decoded += 1
                        audio += slot.value.duration_sec  # type: ignore[union-attr]
                    else:
                        failed += 1

                await asyncio.gather(*(one(k) for k in keys))
                wall = time.perf_counter() - t0
    finally:
        pool.shutdown(wait=True)
    if len(keys) != len(objects) or failed:
        raise RuntimeError(f"io-floor: listed {len(keys)} objects for {len(objects)} uploaded, {failed} failed to decode")
    return ModeResult("io-floor", decoded, audio, wall, **info, details={
        "events_per_second": decoded / wall, "stage_seconds": timings,
        "download_concurrency": st.download_concurrency, "decode_threads": threads,
    })


async def run_plain_floor(settings: Settings, objects: list[StoredObject], concurrency: int = 8) -> ModeResult:
    """The floor a user would write without this project: aiobotocore's own client, list, `concurrency`
    GETs at a time, `soundfile.read` at the file's native rate on a thread pool of the consumer's CPU
    pool size. No 16 kHz view, no tokenizer view, no retries, no size bound: io-floor's costs less ours."""
    import io

    import soundfile as sf
    from aiobotocore.session import get_session

    st = settings
    threads = max(1, min(4, st.resolved_cpu_threads()))
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="plain-cpu")
    loop = asyncio.get_running_loop()
    timings = {"list": 0.0, "download": 0.0, "decode": 0.0}
    audio = 0.0
    decoded = 0
    try:
        async with get_session().create_client("s3", **st.s3_client_kwargs()) as s3:
            with measured("plain-floor") as info:
                t0 = time.perf_counter()
                keys = []
                async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=SMALL_PREFIX):
                    keys += [o["Key"] for o in page.get("Contents", [])]
                timings["list"] = time.perf_counter() - t0
                sem = asyncio.Semaphore(concurrency)

                def decode(data: bytes) -> float:
                    t = time.perf_counter()
                    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
                    timings["decode"] += time.perf_counter() - t
                    return len(samples) / rate

                async def one(key: str) -> None:
                    nonlocal audio, decoded
                    async with sem:
                        t = time.perf_counter()
                        resp = await s3.get_object(Bucket=BUCKET, Key=key)
                        async with resp["Body"] as body:
                            data = await body.read()
                        timings["download"] += time.perf_counter() - t
                    seconds = await loop.run_in_executor(pool, decode, data)  # (`audio += await` would lose updates)
                    audio += seconds
                    decoded += 1

                await asyncio.gather(*(one(k) for k in keys))
                wall = time.perf_counter() - t0
    finally:
        pool.shutdown(wait=True)
    if len(keys) != len(objects):
        raise RuntimeError(f"plain-floor: listed {len(keys)} objects for {len(objects)} uploaded")
    return ModeResult("plain-floor", decoded, audio, wall, **info, details={
        "events_per_second": decoded / wall, "stage_seconds": timings,
        "download_concurrency": concurrency, "decode_threads": threads,
    })
