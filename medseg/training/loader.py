"""Loader worker processes: K processes sample and augment whole batches while the network trains.

``train.loader_workers: K`` (K > 0) replaces the single loader thread (``loader_prefetch``,
:class:`~medseg.training.sampler.PrefetchSampler`) when one thread cannot keep up: patch cropping is light, but
nnU-Net's spatial and intensity augmentation on 128³ patches costs seconds of CPU per batch, and much of it holds
the GIL, so threads do not scale. nnU-Net runs about 12 augmentation processes per A100 for the same reason.

Exactness. Batch i of an epoch is ``sampler.sample_at(i)``: drawn from a generator seeded with (the epoch's
sampler seed, i) alone (:func:`~medseg.training.sampler.iteration_rng`; the sampler seed is already a function of
(seed, epoch, rank)). Which worker draws it, when, and how many workers there are change nothing: iteration i goes
to worker ``i mod K`` and the results are handed out in iteration order. A run killed mid-epoch and resumed from
its last checkpoint therefore draws the same batches, for any K, as the thread and the plain sampler do. Workers
run torch single-threaded; CPU reductions over more than ~32k elements may round differently with another
thread count, so compare runs across K with the same ``num_threads`` where bits matter (the tests use 1).

Design choices (why):
- ``spawn``, not ``fork``: the training process has started OpenMP/MKL thread pools and possibly CUDA, neither of
  which survives ``fork``. Spawning costs an interpreter and a torch import per worker (a few seconds), so the
  workers live for the whole run (:class:`LoaderPool`), receiving each epoch's sampler as a pickle (cases pickle as
  their paths and are reopened memory-mapped, once per worker: ``sampler._REOPENED``). The trainer starts the next
  epoch when the training steps end (``LoaderPool.ahead``), so the workers draw its first batches during validation.
- A bounded number of batches in flight (``depth`` per worker, nnU-Net's ``num_cached_per_queue`` is 2): the main
  process issues iteration i + in_flight only after handing out i, so memory stays bounded however slow the step.
- Batches travel through POSIX shared memory (one block per batch, created by the worker, copied out and unlinked
  by the main process at once): one copy on each side instead of pickling ~100 MB through a pipe. The copy lands in
  page-locked (pinned) torch tensors when CUDA is available, so the step's ``non_blocking`` host-to-device copy is
  truly asynchronous (the CUDA caching host allocator keeps a block until the copies reading it are done).
- Shutdown: :meth:`LoaderPool.close` (called from ``finally`` in the trainer: end of training, an error, Ctrl-C)
  tells the workers to stop, joins them, terminates stragglers and unlinks unclaimed blocks. Workers ignore SIGINT
  (the training process decides) and exit on their own when the training process disappears (SIGKILL): they
  poll their parent while idle. A worker that dies raises :class:`LoaderWorkerError` naming it and its exit code; an
  exception in a worker is raised in the training process with the worker's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import signal
import time
import traceback
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from medseg.errors import MedsegError


#: how often an idle worker checks that the training process is still there, and how often the training process
#: checks its workers while it waits for a batch (seconds)
_POLL_S = 0.5

# a batch is a tuple of arrays (or None: a classifier without ages); each travels as (shape, dtype, offset, wire dtype)
# in one block
_Meta = list[tuple[tuple[int, ...], str, int, str] | None]


def _wire_dtype(a: np.ndarray) -> np.dtype:
    """The narrowest dtype a batch array travels in without loss: int64 label maps whose values fit in int8 go as int8
    (an eighth of the bytes to write into and copy out of shared memory; widened again on arrival), others as they are."""
    if a.dtype == np.int64 and a.size:
        lo, hi = int(a.min()), int(a.max())
        if -128 <= lo and hi <= 127:
            return np.dtype(np.int8)
    return a.dtype


class LoaderWorkerError(MedsegError):
    """A loader worker failed (an exception while drawing a batch) or died (killed, out of memory)."""


# --------------------------------------------------------------------------- worker side
def _pack(batch: tuple[Any, ...]) -> tuple[str, _Meta]:
    """Write a batch's arrays into one new shared-memory block; returns its name and where each array lies."""
    arrays = [None if a is None else np.ascontiguousarray(a) for a in batch]
    meta: _Meta = []
    offset = 0
    for a in arrays:
        if a is None:
            meta.append(None)
            continue
        wire = _wire_dtype(a)
        offset = -(-offset // 64) * 64  # 64-byte aligned, as numpy and SIMD copies like it
        meta.append((tuple(a.shape), a.dtype.str, offset, wire.str))
        offset += a.size * wire.itemsize
    block = shared_memory.SharedMemory(create=True, size=max(offset, 1))
    try:
        for a, m in zip(arrays, meta):
            if a is not None and m is not None:
                np.ndarray(m[0], dtype=m[3], buffer=block.buf, offset=m[2])[...] = a
    except BaseException:
        block.close()
        block.unlink()  # nobody will hear of this block
        raise
    block.close()  # unmap here; the block lives on until the training process unlinks it
    return block.name, meta


def _worker_main(index: int, tasks: Any, results: Any) -> None:
    """A loader worker: for each ``("batch", epoch, i)`` task draw ``sampler.sample_at(i)`` of that epoch's sampler
    and send it back; ``("epoch", epoch, pickled sampler)`` switches samplers; ``None`` stops."""
    import torch

    from medseg.training import sampler as sampler_module

    # Ctrl-C reaches the whole process group: the training process handles it and closes the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one thread per worker: K workers use K cores without oversubscribing them (and draw the same bits for any K)
    torch.set_num_threads(1)
    sampler_module._REOPENED = {}
    # never block exit on unsent results when the training process is gone (its pipe would never drain)
    results.cancel_join_thread()
    parent = mp.parent_process()
    samplers: dict[int, Any] = {}
    while True:
        try:
            task = tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # the training process was killed: no orphans
                return
            continue
        if task is None or (parent is not None and not parent.is_alive()):  # stop, or nobody left to take the batches
            return
        kind, epoch, payload = task
        if kind == "epoch":
            samplers = {epoch: pickle.loads(payload)}  # only the current epoch's sampler is kept
            continue
        try:
            batch = samplers[epoch].sample_at(payload)
            name, meta = _pack(tuple(batch))
            results.put(("batch", epoch, payload, name, meta))
        except BaseException:  # noqa: BLE001 - reported to the training process, which raises it
            results.put(("error", epoch, payload, f"loader worker {index} failed on batch {payload}:\n{traceback.format_exc()}", None))


# --------------------------------------------------------------------------- training-process side
def _unpack(name: str, meta: _Meta, pin: bool) -> tuple[Any, ...]:
    """Copy a batch out of its shared-memory block (into pinned torch tensors when ``pin``) and unlink the block."""
    block = shared_memory.SharedMemory(name=name)
    try:
        out: list[Any] = []
        for m in meta:
            if m is None:
                out.append(None)
                continue
            view = np.ndarray(m[0], dtype=m[3], buffer=block.buf, offset=m[2])
            dtype = np.dtype(m[1])  # the array's own dtype (it may have travelled narrower)
            if pin:
                import torch

                tensor = torch.empty(m[0], dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, pin_memory=True)
                tensor.numpy()[...] = view
                out.append(tensor)
            else:
                out.append(view.astype(dtype))
            del view  # the block cannot be closed while a view exports its buffer
        return tuple(out)
    finally:
        block.close()
        block.unlink()


def _discard(name: str) -> None:
    """Unlink a block nobody will read (a stale batch of an abandoned epoch)."""
    try:
        block = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return
    block.close()
    block.unlink()


class LoaderPool:
    """``workers`` loader processes for a whole training run; :meth:`epoch` hands out one epoch's batches.

    ``depth``: batches in flight per worker (at least 1). ``pin_memory``: None = when CUDA is available.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int, depth: int = 2, pin_memory: bool | None = None):
        if workers < 1:
            raise ValueError(f"a loader pool needs at least one worker, got {workers}")
        if pin_memory is None:
            import torch

            pin_memory = bool(torch.cuda.is_available())
        self.workers, self.in_flight, self.pin_memory = int(workers), int(workers) * max(int(depth), 1), bool(pin_memory)
        context = mp.get_context("spawn")
        self._results = context.Queue()
        self._tasks = [context.Queue() for _ in range(self.workers)]
        self._procs = [context.Process(target=_worker_main, args=(k, self._tasks[k], self._results), name=f"medseg-loader-{k}", daemon=True)
                       for k in range(self.workers)]
        self._epoch = -1
        self._closed = False
        #: epochs started ahead of their turn (the trainer starts the next one before validating), by epoch number
        self.ahead: dict[int, EpochBatches] = {}
        for proc in self._procs:
            proc.start()

    def __enter__(self) -> LoaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (tests check they are gone after :meth:`close`)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def epoch(self, sampler: Any, n_batches: int) -> EpochBatches:
        """Start an epoch: the workers draw ``sampler.sample_at(i)`` for i < ``n_batches``; the returned object's
        :meth:`EpochBatches.sample` hands them out in order. A previous epoch's unclaimed batches are dropped."""
        if self._closed:
            raise RuntimeError("the loader pool is closed")
        if not callable(getattr(sampler, "sample_at", None)):
            raise TypeError(f"loader workers need a sampler with sample_at(iteration), not {type(sampler).__name__}")
        self._epoch += 1
        payload = pickle.dumps(sampler, protocol=pickle.HIGHEST_PROTOCOL)
        for q in self._tasks:
            q.put(("epoch", self._epoch, payload))
        return EpochBatches(self, self._epoch, int(n_batches))

    def _issue(self, epoch: int, iteration: int) -> None:
        self._tasks[iteration % self.workers].put(("batch", epoch, iteration))

    def _receive(self) -> tuple:
        """The next message of any worker; raises :class:`LoaderWorkerError` when a worker has died."""
        while True:
            try:
                return self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [(k, p) for k, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    k, p = dead[0]
                    raise LoaderWorkerError(f"loader worker {k} (pid {p.pid}) died with exit code {p.exitcode} "
                                            f"(negative: killed by signal {-p.exitcode if p.exitcode and p.exitcode < 0 else '-'}; out of memory?)") from None

    def close(self) -> None:
        """Stop the workers and wait for them (terminate those that do not stop), unlink unclaimed batches."""
        if self._closed:
            return
        self._closed = True
        self.ahead.clear()
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):  # a queue already broken by a dead worker
                pass
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(timeout=max(deadline - time.monotonic(), 0.1))
        for p in self._procs:
            if p.is_alive():  # stuck in a long batch: it would only finish work nobody wants
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        while True:  # batches drawn but never claimed: their blocks would outlive us
            try:
                message = self._results.get(timeout=0.05)
            except (queue.Empty, OSError, ValueError, EOFError):
                break
            if message[0] == "batch":
                _discard(message[3])
        for q in self._tasks:  # a dead worker never reads its queue: do not wait to flush it
            q.cancel_join_thread()
            q.close()
        self._results.close()


class EpochBatches:
    """One epoch's batches from a :class:`LoaderPool`, in iteration order (whatever order the workers finish in).

    :meth:`sample` returns the next batch (numpy arrays, or pinned torch tensors with ``pin_memory``); exactly
    ``n_batches`` are drawn. A worker's exception is raised as :class:`LoaderWorkerError` with its traceback, in
    its batch's turn; a worker that died is reported at once.
    """

    def __init__(self, pool: LoaderPool, epoch: int, n_batches: int):
        self._pool, self._epoch, self._n = pool, epoch, n_batches
        self._next = 0  # the next iteration handed out
        self._issued = 0  # iterations sent to the workers so far
        self._ready: dict[int, tuple] = {}  # results (and errors) that arrived before their turn: (kind, block or message, meta)
        self._fill()

    def _fill(self) -> None:
        """Keep up to ``in_flight`` batches issued beyond the ones handed out (the bound on memory)."""
        while self._issued < self._n and self._issued < self._next + self._pool.in_flight:
            self._pool._issue(self._epoch, self._issued)
            self._issued += 1

    def sample(self) -> tuple[Any, ...]:
        if self._next >= self._n:
            raise RuntimeError(f"all {self._n} batches of the epoch were used")
        while self._next not in self._ready:
            kind, epoch, iteration, body, meta = self._pool._receive()
            if epoch != self._epoch:  # a batch of an epoch abandoned early (an error upstream): nobody wants it
                if kind == "batch":
                    _discard(body)
                continue
            # an error waits for its batch's turn, like a result: the batches before it are still handed out, so
            # where a run stops does not depend on which worker was faster
            self._ready[iteration] = (kind, body, meta)
        kind, body, meta = self._ready.pop(self._next)
        if kind == "error":
            raise LoaderWorkerError(body)
        batch = _unpack(body, meta, self._pool.pin_memory)
        self._next += 1
        self._fill()
        return batch

    def close(self) -> None:
        """Nothing to stop (the pool's workers serve the next epoch); unclaimed blocks are unlinked."""
        for kind, body, _ in self._ready.values():
            if kind == "batch":
                _discard(body)
        self._ready.clear()


__all__ = ["EpochBatches", "LoaderPool", "LoaderWorkerError"]
