"""Giving freed heap memory back to the operating system after each inference request.

Why: one request decodes, resamples and predicts a few hundred MB of arrays in a worker thread. When they
are freed, glibc keeps much of that memory in its per-thread heaps (arenas) instead of returning it, and
its dynamic mmap threshold rises after the first large frees, so later large arrays land in those heaps
too. The server's resident memory (RSS) then climbs with every request until it looks like a leak and a
Kubernetes memory limit kills the pod; the predictor itself holds nothing between requests
(tests/test_serving_memory.py).

Measured here (a 128³ four-channel case on a 2 mm plan, 4 worker threads, rounds of 8 predictions, RSS
after each round / after ``malloc_trim(0)``): glibc's defaults 1.05–1.34 GiB / 0.58–0.67 GiB, varying
round to round; with a fixed 4 MiB mmap threshold 0.66–0.68 GiB / 0.57 GiB, level (a 1 MiB threshold: also
level, but ~15 % slower from page faults). The trim itself takes 14–25 ms. The server under a 150 s soak
(``benchmarks/serve_load.py --plan-spacing 2 --soak 150``, 2 clients, idle RSS before → after): neither
+16 %; trim only +6.5 % (p50 3.64 s); trim and the 4 MiB threshold +2.2 % (p50 3.85 s; 16 MiB: +2.3 %,
3.86 s), the mean RSS under load level from the first quarter of the soak to the last. The price: mapping
fresh pages for large arrays (activations included) costs time; one client, 2 mm plan, server predict stage
1.65–1.68 s with glibc's threshold against 1.85 s with 4 MiB (+11 %); on the 1 mm plan, where the network
forward dominates, in-process runs did not separate it from run-to-run noise (6.3–8.0 s against 7.0–8.6 s).
Bounded memory is the default for a pod with a memory limit; ``MEDSEG_SERVE_MMAP_THRESHOLD_MB=0`` trades it
back for throughput (the trim still runs).

So :func:`configure_allocator` (at server start) fixes the mmap threshold, which also stops glibc's
dynamic raising of it: arrays of 4 MiB and more are mapped and unmapped on their own and go back to the OS
when freed. :class:`HeapTrimmer` runs ``malloc_trim(0)`` in its own thread whenever a request has left the
server (:meth:`HeapTrimmer.request`), at most once per ``min_interval_s``, so neither the event loop nor a
request waits for it. Where the C library is not glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def _load_glibc_functions():
    """glibc's ``malloc_trim`` and ``mallopt`` (None, None with another C library)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None, None
    try:
        libc = ctypes.CDLL(name)
        trim, mallopt = libc.malloc_trim, libc.mallopt  # glibc only
    except (OSError, AttributeError):
        return None, None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return trim, mallopt


_MALLOC_TRIM, _MALLOPT = _load_glibc_functions()
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc's malloc.h
DEFAULT_MMAP_THRESHOLD_MIB = 4.0


def configure_allocator(mmap_threshold_mib: float | None = None) -> bool:
    """Fix glibc's mmap threshold at ``mmap_threshold_mib`` (default: ``$MEDSEG_SERVE_MMAP_THRESHOLD_MB``, else 4;
    0 = leave glibc's dynamic threshold). Left alone when ``MALLOC_MMAP_THRESHOLD_`` is set (glibc read it at start).
    True if the threshold was set."""
    if mmap_threshold_mib is None:
        mmap_threshold_mib = float(os.environ.get("MEDSEG_SERVE_MMAP_THRESHOLD_MB", DEFAULT_MMAP_THRESHOLD_MIB))
    if _MALLOPT is None or mmap_threshold_mib <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    ok = _MALLOPT(_M_MMAP_THRESHOLD, int(mmap_threshold_mib * 1024 * 1024)) == 1
    if ok:
        log.info("heap: arrays of %.3g MiB and more are mapped on their own (mmap threshold fixed)", mmap_threshold_mib)
    return ok


def trim_heap() -> bool:
    """Return freed heap memory to the OS now (glibc ``malloc_trim(0)``). False where that is not available."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class HeapTrimmer:
    """A daemon thread that calls :func:`trim_heap` after requests, at most once per ``min_interval_s`` seconds."""

    def __init__(self, min_interval_s: float = 1.0):
        self.min_interval_s = float(min_interval_s)
        self.trims = 0
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return _MALLOC_TRIM is not None

    def request(self) -> None:
        """A request has left the server: trim soon (started lazily on the first call)."""
        if not self.available:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="medseg-heap-trim", daemon=True)
                self._thread.start()
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                trim_heap()
                self.trims += 1
            except Exception:  # noqa: BLE001 (never let housekeeping take the server down)
                log.exception("malloc_trim failed")
            time.sleep(self.min_interval_s)
