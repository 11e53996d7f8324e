"""Serving limits: how big a request may be, how many run or wait at once, how much memory their bodies may
take once parsed, and how long one may take.

:class:`ServeLimits` holds the numbers (``medseg serve`` options, else ``MEDSEG_SERVE_*`` environment
variables, else the defaults below). :class:`Gate` admits at most ``max_concurrent + max_queue`` inference
requests into the server, and only while the admitted bodies' bytes times their parse growth (:data:`PARSE_GROWTH`,
measured by ``benchmarks/parse_growth.py``) stay under the memory budget (``--memory-budget-mb``, else half the
container's memory limit read from the cgroup, :func:`container_memory_bytes`); each admitted request holds a :class:`Ticket` until its HTTP exchange has ended
**and** every worker thread it started has returned, so a request that timed out (504) keeps its slot while
its thread still holds memory, and memory stays bounded by the admission capacity.

The ticket of the current request travels in the context variable :data:`CURRENT_TICKET` (set by the ASGI
guard in :mod:`medseg.serving.guard`, visible in the model's handlers and in worker threads started with
:func:`run_in_worker`). Without the guard (in-process use) there is no ticket and no admission control.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from medseg.errors import MedsegError

T = TypeVar("T")

MIB = 1024 * 1024

# name of the option → (environment variable, default, type)
_SETTINGS: dict[str, tuple[str, float | int, type]] = {
    "max_request_mb": ("MEDSEG_SERVE_MAX_REQUEST_MB", 200.0, float),
    "max_voxels": ("MEDSEG_SERVE_MAX_VOXELS", 2**25, int),
    "max_concurrent": ("MEDSEG_SERVE_MAX_CONCURRENT", 1, int),
    "max_queue": ("MEDSEG_SERVE_MAX_QUEUE", 4, int),
    "timeout_s": ("MEDSEG_SERVE_TIMEOUT_S", 300.0, float),
    "reload_interval_s": ("MEDSEG_SERVE_RELOAD_INTERVAL_S", 60.0, float),
    "memory_budget_mb": ("MEDSEG_SERVE_MEMORY_BUDGET_MB", 0.0, float),  # 0: half the container's memory limit
}

#: Peak memory of decoding a request, per byte of its body, by encoding: measured by benchmarks/parse_growth.py
#: (2026-12-05, the real server, a 4×64³ FP32 case, peak RSS above the RSS before the request; results in
#: benchmarks/results/parse_growth*.json). JSON: 5.1x with 7-digit values, 12.7–12.9x with short ones ("5.0, ", the
#: most values per byte: the worst case); binary extension: 2.05–2.07x. Rounded up, JSON at its worst case:
#: admission must not under-count. Prediction (resampling, activations) comes on top for the running requests
#: only, which ``max_concurrent`` bounds (full requests peaked at 13.7–17x a binary body, 6.5–18.7x a JSON one).
#: NIfTI files inside a body are charged as bytes too; their decompressed size is bounded by ``max_voxels``.
PARSE_GROWTH = {"json": 13.0, "binary": 2.5}
#: Share of the container's memory limit the request bodies may take once parsed (the model, its activations and
#: the Python runtime need the rest).
BUDGET_SHARE_OF_LIMIT = 0.5
#: Budget when no limit can be read and the machine's RAM is unknown either.
FALLBACK_BUDGET_BYTES = 4 * 1024**3
_UNLIMITED = 1 << 60  # cgroup v1 writes a huge number (~2**63, page-aligned) for "no limit"


def container_memory_bytes(root: str = "/sys/fs/cgroup") -> int | None:
    """The container's memory limit in bytes from the cgroup (v2 ``memory.max``, v1 ``memory/memory.limit_in_bytes``);
    None when unlimited ("max" or v1's huge number) or unreadable."""
    for path in (os.path.join(root, "memory.max"), os.path.join(root, "memory", "memory.limit_in_bytes")):
        try:
            text = open(path, encoding="ascii").read().strip()  # noqa: SIM115 (one short read)
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if 0 < value < _UNLIMITED else None
    return None


def machine_memory_bytes() -> int | None:
    """Physical RAM in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget_bytes(cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """``(bytes, where it came from)``: half the cgroup's memory limit, else half the machine's RAM, else 4 GiB."""
    limit = container_memory_bytes(cgroup_root)
    if limit is not None:
        return int(limit * BUDGET_SHARE_OF_LIMIT), f"half the container's memory limit ({limit / MIB:.0f} MiB, cgroup)"
    ram = machine_memory_bytes()
    if ram is not None:
        return int(ram * BUDGET_SHARE_OF_LIMIT), f"half the machine's RAM ({ram / MIB:.0f} MiB; the cgroup sets no limit)"
    return FALLBACK_BUDGET_BYTES, "the 4 GiB default (no cgroup limit, RAM unknown)"


@dataclass(frozen=True)
class ServeLimits:
    """The limits of one model server.

    - ``max_request_mb``: largest request body, in MiB (2**20 bytes); larger → 413.
    - ``max_voxels``: largest volume, in voxels per channel (I*J*K), both as sent and after resampling to the
      model's spacing; larger → 400 with the numbers.
    - ``max_concurrent``: inferences running at once (the predictor's slots).
    - ``max_queue``: admitted requests waiting beyond those; one more → 503 with ``Retry-After``.
    - ``timeout_s``: seconds from admission to the answer; later → 504.
    - ``reload_interval_s``: seconds between checks of a ``models:/NAME@ALIAS`` alias (0: no polling).
    - ``memory_budget_mb``: MiB the admitted bodies may take once parsed (bytes × :data:`PARSE_GROWTH`); 0: half the
      container's memory limit (cgroup), else half the machine's RAM.
    """

    max_request_mb: float = 200.0
    max_voxels: int = 2**25
    max_concurrent: int = 1
    max_queue: int = 4
    timeout_s: float = 300.0
    reload_interval_s: float = 60.0
    memory_budget_mb: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.max_request_mb) and self.max_request_mb > 0):
            problems.append(f"max_request_mb must be > 0 (got {self.max_request_mb})")
        if self.max_voxels < 1:
            problems.append(f"max_voxels must be >= 1 (got {self.max_voxels})")
        if self.max_concurrent < 1:
            problems.append(f"max_concurrent must be >= 1 (got {self.max_concurrent})")
        if self.max_queue < 0:
            problems.append(f"max_queue must be >= 0 (got {self.max_queue})")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            problems.append(f"timeout_s must be > 0 (got {self.timeout_s})")
        if not (math.isfinite(self.reload_interval_s) and self.reload_interval_s >= 0):
            problems.append(f"reload_interval_s must be >= 0 (got {self.reload_interval_s})")
        if not (math.isfinite(self.memory_budget_mb) and self.memory_budget_mb >= 0):
            problems.append(f"memory_budget_mb must be >= 0 (got {self.memory_budget_mb})")
        if problems:
            raise MedsegError("invalid serving limits: " + "; ".join(problems))

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MIB)

    def memory_budget(self) -> tuple[int, str]:
        """``(bytes, where it came from)`` of the parse-memory budget."""
        if self.memory_budget_mb > 0:
            return int(self.memory_budget_mb * MIB), "--memory-budget-mb"
        return default_memory_budget_bytes()

    @property
    def capacity(self) -> int:
        """Inference requests admitted at once (running + queued)."""
        return self.max_concurrent + self.max_queue

    @classmethod
    def resolve(cls, env: dict[str, str] | None = None, **given: float | int | None) -> ServeLimits:
        """Each setting from ``given`` (CLI options; None = not given), else its ``MEDSEG_SERVE_*`` variable, else the default."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for name, (var, default, kind) in _SETTINGS.items():
            value = given.get(name)
            if value is None and env.get(var, "").strip():
                try:
                    value = kind(float(env[var])) if kind is int else kind(env[var])
                except ValueError:
                    raise MedsegError(f"environment variable {var}={env[var]!r} is not a number") from None
            values[name] = default if value is None else value
        return cls(**values)


def env_help(name: str) -> str:
    """``(env VAR, default D)`` for an option's help text."""
    var, default, _ = _SETTINGS[name]
    return f"(env {var}; default {default})"


class RequestAbandoned(Exception):
    """Raised in a worker thread that found its request already answered (timed out): the work is skipped."""


@dataclass
class Ticket:
    """One admitted inference request. Holds its admission slot until released by the HTTP side and by every
    worker thread that entered it. ``binary`` holds the tensors the guard parsed from a binary-extension body."""

    gate: Gate
    cost: int = 0  # parse-memory bytes reserved in the gate (body bytes × growth)
    started: float = field(default_factory=time.monotonic)
    binary: dict[str, Any] = field(default_factory=dict)
    abandoned: bool = False
    _refs: int = 1
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> bool:
        """A worker thread starts work for this request; False if the request was already given up."""
        with self._lock:
            if self._closed or self.abandoned:
                return False
            self._refs += 1
            return True

    def leave(self) -> None:
        """A worker thread that entered is done."""
        self._drop()

    def finish(self, abandoned: bool = False) -> None:
        """The HTTP exchange is over (``abandoned``: answered without waiting for the work, e.g. 504)."""
        if abandoned:
            self.abandoned = True
        self._drop()

    def _drop(self) -> None:
        with self._lock:
            self._refs -= 1
            close = self._refs == 0 and not self._closed
            if close:
                self._closed = True
        if close:
            self.gate.release(time.monotonic() - self.started, self.cost)


class Gate:
    """Admission control: at most ``capacity`` tickets out at once, holding at most ``budget_bytes`` of parse memory."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None, on_release: Callable[[], None] | None = None,
                 budget_bytes: int | None = None, on_bytes: Callable[[int], None] | None = None):
        """``on_change(admitted)`` after every admission and release; ``on_release()`` after a release (a request,
        its threads included, has left the server: the guard gives freed heap memory back then). ``budget_bytes``:
        the parse memory all admitted requests may hold (None: unbounded); ``on_bytes(reserved)`` after it changes."""
        self.capacity = capacity
        self.budget_bytes = budget_bytes
        self._reserved = 0
        self._admitted = 0
        self._lock = threading.Lock()
        self._mean_seconds: float | None = None  # moving average of how long an admitted request holds its slot
        self._on_change = on_change
        self._on_release = on_release
        self._on_bytes = on_bytes

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def fits_alone(self, cost: int) -> bool:
        """Whether a request of parse memory ``cost`` could ever be admitted (it fits the budget on its own)."""
        return self.budget_bytes is None or cost <= self.budget_bytes

    def try_admit(self, cost: int = 0) -> Ticket | None:
        """A ticket holding ``cost`` bytes of parse memory, or None when ``capacity`` requests are already admitted
        or ``cost`` does not fit beside what is reserved."""
        with self._lock:
            if self._admitted >= self.capacity or not self._fits(cost):
                return None
            self._admitted += 1
            self._reserved += cost
            count, reserved = self._admitted, self._reserved
        if self._on_change:
            self._on_change(count)
        if self._on_bytes:
            self._on_bytes(reserved)
        return Ticket(self, cost=cost)

    def try_reserve(self, ticket: Ticket, more: int) -> bool:
        """Add ``more`` bytes to an admitted ticket (a body sent without a length, counted once read); False if they do not fit."""
        with self._lock:
            if not self._fits(more):
                return False
            self._reserved += more
            ticket.cost += more
            reserved = self._reserved
        if self._on_bytes:
            self._on_bytes(reserved)
        return True

    def _fits(self, cost: int) -> bool:
        return self.budget_bytes is None or self._reserved + cost <= self.budget_bytes

    def release(self, seconds: float, cost: int = 0) -> None:
        with self._lock:
            self._admitted -= 1
            self._reserved -= cost
            count, reserved = self._admitted, self._reserved
            self._mean_seconds = seconds if self._mean_seconds is None else 0.8 * self._mean_seconds + 0.2 * seconds
        if self._on_change:
            self._on_change(count)
        if self._on_bytes:
            self._on_bytes(reserved)
        if self._on_release:
            self._on_release()

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: about one request's time in the server (5 s before any was measured)."""
        mean = self._mean_seconds
        return 5 if mean is None else max(1, min(600, math.ceil(mean)))


CURRENT_TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("medseg_current_ticket", default=None)


async def run_in_worker(fn: Callable[..., T], *args: Any) -> T:
    """``await asyncio.to_thread(fn, *args)``, keeping the current request's admission slot while the thread runs.

    If the request was given up (timed out) before the thread starts, ``fn`` is not run.
    """
    ticket = CURRENT_TICKET.get()

    def job() -> T:
        if ticket is None:
            return fn(*args)
        if not ticket.enter():
            raise RequestAbandoned("the request was answered already (timeout)")
        try:
            return fn(*args)
        finally:
            ticket.leave()

    return await asyncio.to_thread(job)
