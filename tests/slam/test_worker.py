"""The mapper worker: inline and threaded jobs, back-pressure, failures and shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from slam.worker import MapperWorker, MappingError


def _mapper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "v2d-mapper"]


def test_synchronous_mode_runs_each_job_inside_submit():
    done: list[tuple[list[int], str]] = []
    worker = MapperWorker(lambda jobs: done.append((jobs, threading.current_thread().name)), concurrent=False,
                          max_pending=1)
    for j in range(3):
        worker.submit(j)
        assert done[-1][0] == [j]  # finished before submit returned, one job at a time
    assert {name for _, name in done} == {threading.current_thread().name}
    assert not _mapper_threads()
    worker.close()


def test_concurrent_jobs_run_in_order_in_one_thread():
    done: list[tuple[list[int], str]] = []
    worker = MapperWorker(lambda jobs: done.append((jobs, threading.current_thread().name)), concurrent=True,
                          max_pending=2)
    for j in range(6):
        worker.submit(j)
    worker.wait()
    assert [j for jobs, _ in done for j in jobs] == list(range(6))
    assert {name for _, name in done} == {"v2d-mapper"}
    worker.close()
    assert not _mapper_threads()


def test_jobs_queued_while_the_worker_is_busy_come_as_one_batch():
    release = threading.Event()
    batches: list[list[int]] = []

    def work(jobs: list[int]) -> None:
        batches.append(jobs)
        release.wait(10)

    worker = MapperWorker(work, concurrent=True, max_pending=3)
    worker.submit(0)
    while not batches:
        time.sleep(0.01)
    for j in (1, 2, 3):
        worker.submit(j)
    release.set()
    worker.wait()
    worker.close()
    assert batches == [[0], [1, 2, 3]]


def test_submit_waits_only_when_the_queue_is_full():
    release = threading.Event()
    started = threading.Event()

    def work(jobs: list[int]) -> None:
        started.set()
        release.wait(10)

    worker = MapperWorker(work, concurrent=True, max_pending=2)
    worker.submit(0)
    assert started.wait(5)  # job 0 runs; the queue is empty again
    t0 = time.perf_counter()
    worker.submit(1)
    worker.submit(2)  # two queued: still no wait
    assert time.perf_counter() - t0 < 0.5
    blocked = threading.Thread(target=worker.submit, args=(3,))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # the third queued job waits for room (back-pressure)
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    worker.wait()
    worker.close()


def test_a_failing_job_stops_the_run_with_one_error_and_no_thread_left():
    release = threading.Event()
    calls: list[list[int]] = []

    def work(jobs: list[int]) -> None:
        calls.append(jobs)
        release.wait(10)
        if 0 in jobs:
            raise RuntimeError("boom")

    worker = MapperWorker(work, concurrent=True, max_pending=4)
    worker.submit(0)
    while not calls:
        time.sleep(0.01)
    worker.submit(1)
    worker.submit(2)
    release.set()
    with pytest.raises(MappingError, match="mapping failed: RuntimeError: boom") as info:
        worker.wait()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert calls == [[0]]  # the jobs queued behind the failure were skipped
    with pytest.raises(MappingError):
        worker.submit(3)
    worker.close(abort=True)
    assert not _mapper_threads()


def test_a_failure_unblocks_a_submit_waiting_for_room():
    release = threading.Event()

    def work(jobs: list[int]) -> None:
        release.wait(10)
        raise ValueError(f"bad keyframe {jobs[0]}")

    worker = MapperWorker(work, concurrent=True, max_pending=1)
    worker.submit(0)
    worker.submit(1)
    errors: list[BaseException] = []

    def submit_more() -> None:
        try:
            for j in range(2, 5):
                worker.submit(j)
        except MappingError as exc:
            errors.append(exc)

    t = threading.Thread(target=submit_more)
    t.start()
    release.set()
    t.join(5)
    assert not t.is_alive() and errors and "bad keyframe 0" in str(errors[0])
    worker.close(abort=True)
    assert not _mapper_threads()


def test_abort_skips_queued_jobs_and_close_is_idempotent():
    release = threading.Event()
    ran: list[int] = []

    def work(jobs: list[int]) -> None:
        ran.extend(jobs)
        release.wait(10)

    worker = MapperWorker(work, concurrent=True, max_pending=4)
    worker.submit(0)
    while not ran:
        time.sleep(0.01)
    for j in range(1, 4):
        worker.submit(j)
    closer = threading.Thread(target=worker.close, kwargs={"abort": True})
    closer.start()
    while not worker.stopping:
        time.sleep(0.01)
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert ran == [0]  # the running job finished; the queued ones were skipped
    worker.close(abort=True)
    assert not _mapper_threads()


def test_on_start_runs_in_the_worker_thread():
    names: list[str] = []
    worker = MapperWorker(lambda jobs: None, concurrent=True, max_pending=1,
                          on_start=lambda: names.append(threading.current_thread().name))
    worker.submit(0)
    worker.wait()
    worker.close()
    assert names == ["v2d-mapper"]
