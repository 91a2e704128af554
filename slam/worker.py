"""The mapper's thread: keyframe jobs from a bounded queue, errors back to the caller.

    worker = MapperWorker(mapper.map_keyframes, concurrent=True, max_pending=2)
    worker.submit(job)     # returns at once; waits only when `max_pending` jobs are queued
    worker.wait()          # every submitted job done (re-raises a mapper failure)
    worker.close()         # stop the thread (abort=True skips queued jobs: Ctrl-C, errors)

With `concurrent=False` a job runs inside `submit`, in the caller's thread: the synchronous mode
whose results are identical run to run. With `concurrent=True` one thread owns the loop; PyTorch
and OpenCV release the GIL in their kernels, so tracking (the caller's thread) and mapping overlap
on two cores. The work function takes a batch: the thread hands it every job queued by the time it
is free (oldest first), so a mapper that fell behind catches up with one pass. A job that raises
stops the worker: the next `submit`, `wait` or `close` raises `MappingError` naming the failure
(the original is chained), and queued jobs are skipped, so no thread is left waiting on another.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from v2d.errors import V2DError

__all__ = ["MapperWorker", "MappingError"]

_log = logging.getLogger(__name__)

Job = TypeVar("Job")
_STOP = object()
_POLL_S = 0.1  # how often a blocked caller looks for a failure of the worker


class MappingError(V2DError):
    """The mapper failed on a keyframe (the cause is chained)."""


class MapperWorker(Generic[Job]):
    """Runs `work(jobs)` on the submitted jobs, inline (one at a time) or in one background thread
    (every job queued when it is free, as one batch).

    Args:
        work: the batch function (the mapper's `map_keyframes`).
        concurrent: run jobs in a background thread.
        max_pending: jobs that may wait in the queue before `submit` blocks (back-pressure).
        on_start: called once in the worker thread before its first job (thread-local settings).
    """

    def __init__(self, work: Callable[[list[Job]], None], concurrent: bool, max_pending: int,
                 on_start: Callable[[], None] | None = None) -> None:
        self._work = work
        self.concurrent = concurrent
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._thread: threading.Thread | None = None
        if concurrent:
            self._thread = threading.Thread(target=self._loop, args=(on_start,), name="v2d-mapper", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Map `job` (now, or queued for the thread; blocks while `max_pending` jobs wait)."""
        self.check()
        if not self.concurrent:
            self._work([job])
            return
        if not self.alive:
            raise MappingError("the mapper thread has stopped")
        while True:
            try:
                self._queue.put(job, timeout=_POLL_S)
                return
            except queue.Full:
                self.check()

    def wait(self) -> None:
        """Block until every submitted job is done; raises MappingError if one failed."""
        if self.concurrent:
            while self._queue.unfinished_tasks and self.alive:
                with self._queue.all_tasks_done:
                    self._queue.all_tasks_done.wait(_POLL_S)
        self.check()

    def check(self) -> None:
        """Raise MappingError if a job failed."""
        if self._error is not None:
            err = self._error
            raise MappingError(f"mapping failed: {type(err).__name__}: {err}") from err

    def close(self, abort: bool = False, timeout: float | None = None) -> None:
        """Stop the thread: after the queued jobs, or (abort) after the running one. Idempotent.

        Raises MappingError if a job failed and `abort` is False.
        """
        if self._thread is not None:
            if abort:
                self._abort.set()
            while self._thread.is_alive():  # the thread consumes jobs (or skips them) until it meets _STOP
                try:
                    self._queue.put(_STOP, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            self._thread.join(timeout)
            if self._thread.is_alive():
                _log.warning("the mapper thread did not stop within %s s; leaving it (daemon)", timeout)
            self._thread = None
        if not abort:
            self.check()

    @property
    def stopping(self) -> bool:
        """True once an abort was asked for (queued jobs are skipped from then on)."""
        return self._abort.is_set()

    def _loop(self, on_start: Callable[[], None] | None) -> None:
        if on_start is not None:
            try:
                on_start()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
                self._error = exc
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not _STOP:  # everything queued by now joins the batch
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is _STOP
            jobs = batch[:-1] if stop else batch
            try:
                if jobs and self._error is None and not self._abort.is_set():
                    self._work(jobs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
                _log.debug("mapper job failed", exc_info=True)
                self._error = exc
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return
