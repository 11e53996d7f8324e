"""Cases in parallel: one case per worker process at a time, with a progress bar.

A case is the unit of work (nnU-Net does the same): the arrays of one case are the peak memory of a
worker, so ``workers`` cases are in memory at once. Results come back in job order whatever the order
of completion; the first failure cancels the jobs not started yet and is raised as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from tqdm import tqdm

J = TypeVar("J")
R = TypeVar("R")


def default_workers() -> int:
    """The number of cores this process may run on (its CPU affinity, not the machine's core count)."""
    return len(os.sched_getaffinity(0))


def run_cases(fn: Callable[[J], R], jobs: list[J], workers: int | None, desc: str, progress: bool = True) -> list[R]:
    """``[fn(job) for job in jobs]`` in ``workers`` processes (None: :func:`default_workers`).

    ``fn`` must be a module-level function and ``jobs`` picklable. With one worker (or one job) everything
    runs in this process, which keeps tracebacks and profiles simple.
    """
    n = max(1, min(int(workers or default_workers()), len(jobs) or 1))
    # the bars are closed on an error too, so that the error message starts on a line of its own
    if n == 1:
        with tqdm(jobs, desc=desc, unit="case", disable=not progress) as bar:
            return [fn(j) for j in bar]
    results: list[Any] = [None] * len(jobs)
    with ProcessPoolExecutor(n) as pool:
        futures = {pool.submit(fn, j): i for i, j in enumerate(jobs)}
        try:
            with tqdm(as_completed(futures), total=len(jobs), desc=desc, unit="case", disable=not progress) as bar:
                for fut in bar:
                    results[futures[fut]] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return results
