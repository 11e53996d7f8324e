"""Serving limits: how big a request may be, how many run or wait at once, and how long one may take.

:class:`ServeLimits` holds the numbers (``medseg serve`` options, else ``MEDSEG_SERVE_*`` environment
variables, else the defaults below). :class:`Gate` admits at most ``max_concurrent + max_queue`` inference
requests into the server; each admitted request holds a :class:`Ticket` until its HTTP exchange has ended
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
}


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
    """

    max_request_mb: float = 200.0
    max_voxels: int = 2**25
    max_concurrent: int = 1
    max_queue: int = 4
    timeout_s: float = 300.0
    reload_interval_s: float = 60.0

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
        if problems:
            raise MedsegError("invalid serving limits: " + "; ".join(problems))

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MIB)

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
            self.gate.release(time.monotonic() - self.started)


class Gate:
    """Admission control: at most ``capacity`` tickets out at once."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None, on_release: Callable[[], None] | None = None):
        """``on_change(admitted)`` after every admission and release; ``on_release()`` after a release (a request,
        its threads included, has left the server: the guard gives freed heap memory back then)."""
        self.capacity = capacity
        self._admitted = 0
        self._lock = threading.Lock()
        self._mean_seconds: float | None = None  # moving average of how long an admitted request holds its slot
        self._on_change = on_change
        self._on_release = on_release

    @property
    def admitted(self) -> int:
        return self._admitted

    def try_admit(self) -> Ticket | None:
        """A ticket, or None when ``capacity`` requests are already admitted."""
        with self._lock:
            if self._admitted >= self.capacity:
                return None
            self._admitted += 1
            count = self._admitted
        if self._on_change:
            self._on_change(count)
        return Ticket(self)

    def release(self, seconds: float) -> None:
        with self._lock:
            self._admitted -= 1
            count = self._admitted
            self._mean_seconds = seconds if self._mean_seconds is None else 0.8 * self._mean_seconds + 0.2 * seconds
        if self._on_change:
            self._on_change(count)
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
