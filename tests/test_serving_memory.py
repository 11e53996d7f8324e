"""Heap trimming after requests (medseg/serving/memory.py) and the predictor holding nothing between requests."""

from __future__ import annotations

import ctypes.util
import gc
import importlib.util
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from medseg.serving import memory
from medseg.serving.limits import Gate

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c") is not None


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is a glibc function")
def test_trim_heap_and_trimmer_thread():
    assert memory.trim_heap() is True
    trimmer = memory.HeapTrimmer(min_interval_s=0.05)
    assert trimmer.available and trimmer.trims == 0
    trimmer.request()
    deadline = time.monotonic() + 10
    while trimmer.trims < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trimmer.trims >= 1
    first_thread = trimmer._thread
    trimmer.request()  # the same thread serves later requests
    assert trimmer._thread is first_thread


def test_gate_reports_every_release():
    released, counts = [], []
    gate = Gate(2, on_change=counts.append, on_release=lambda: released.append(1))
    a, b = gate.try_admit(), gate.try_admit()
    assert gate.try_admit() is None and released == [] and counts == [1, 2]
    a.finish()
    assert released == [1] and counts == [1, 2, 1]
    assert b.enter()  # a worker thread still holds b after its HTTP side ended: no release until it leaves
    b.finish()
    assert released == [1]
    b.leave()
    assert released == [1, 1] and gate.admitted == 0


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is a glibc function")
def test_predictor_holds_no_memory_between_requests(tmp_path):
    """Rounds of concurrent predictions, each followed by a trim: resident memory after the trim stays level
    (a leak of each prediction's input alone, 4×96³ float32 = 13.5 MiB, would add > 400 MiB over 32 requests;
    single rounds vary by a few tens of MiB, so the lower of the last two rounds is compared)."""
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from medseg.inference.predictor import Predictor

    paths = bench.write_case(tmp_path / "case", (96, 96, 96))
    predictor = Predictor.from_package(bench.build_package(tmp_path / "model", (96, 96, 96), plan_spacing=2.0), device="cpu")
    process = psutil.Process()

    def rss_after_round(pool: ThreadPoolExecutor, requests: int) -> float:
        list(pool.map(lambda _: predictor.predict_files(paths), range(requests)))
        gc.collect()
        memory.trim_heap()
        return process.memory_info().rss / 2**20

    with ThreadPoolExecutor(4) as pool:
        warm = rss_after_round(pool, 8)
        later = [rss_after_round(pool, 8) for _ in range(4)]
    assert min(later[-2:]) - warm < 60, f"RSS after trimming: warm {warm:.0f} MiB, later rounds {[round(x) for x in later]} MiB"


@pytest.mark.skipif(not GLIBC, reason="mallopt is a glibc function")
def test_configure_allocator(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MEDSEG_SERVE_MMAP_THRESHOLD_MB", raising=False)
    assert memory.configure_allocator() is True  # the default 4 MiB
    assert memory.configure_allocator(0) is False  # 0: glibc's own dynamic threshold is left alone
    monkeypatch.setenv("MEDSEG_SERVE_MMAP_THRESHOLD_MB", "0")
    assert memory.configure_allocator() is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")  # the operator's own setting wins
    assert memory.configure_allocator(8) is False
