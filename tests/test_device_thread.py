"""The device thread runs the oldest batch's model work first, whatever order it was queued in."""

from __future__ import annotations

import threading

import pytest

from pipeline.models import DeviceThread


def test_queued_jobs_run_oldest_batch_first():
    device = DeviceThread()
    gate = threading.Event()
    ran: list[str] = []
    blocker = device.submit(0, gate.wait)  # the device is busy with batch 0
    jobs = [
        device.submit(3, lambda: ran.append("batch 3 transcribe")),
        device.submit(2, lambda: ran.append("batch 2 transcribe")),
        device.submit(1, lambda: ran.append("batch 1 tokenize")),
        device.submit(2, lambda: ran.append("batch 2 tokenize")),
    ]
    gate.set()
    for j in [blocker, *jobs]:
        j.result(timeout=5)
    device.shutdown()
    assert ran == ["batch 1 tokenize", "batch 2 transcribe", "batch 2 tokenize", "batch 3 transcribe"]


def test_a_failing_job_reports_its_error_and_the_thread_goes_on():
    device = DeviceThread()
    bad = device.submit(0, lambda: 1 / 0)
    good = device.submit(0, lambda: "still running")
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=5)
    assert good.result(timeout=5) == "still running"
    device.shutdown()
    device.shutdown()  # safe twice
