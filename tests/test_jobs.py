"""RQ jobs: JSON serializer, unique ids, and retry of a job whose worker was SIGKILLed."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import redis
from helpers import Procs, wait_for
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from cloudq import jobs
from cloudq.central.server import Central
from cloudq.keys import Keys
from cloudq.settings import Settings


def test_job_ids_are_deterministic_and_enqueued_once(r: redis.Redis, keys: Keys) -> None:
    assert jobs.enqueue(r, keys, "close", "s1", 3, "h1", "grace")
    assert not jobs.enqueue(r, keys, "close", "s1", 3, "h1", "grace")
    assert jobs.enqueue(r, keys, "close", "s1", 4, "h1", "grace")
    q = jobs.queue_for(r, keys, "h1")
    assert q.count == 2
    import json
    import zlib

    raw = r.hget(f"rq:job:{q.job_ids[0]}", "data")
    json.loads(zlib.decompress(raw))  # RQ compresses the payload; inside it is JSON, never pickle


@pytest.mark.slow
def test_job_of_a_sigkilled_worker_is_retried_and_completes_within_60s(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    central = Central(r, keys, Settings(), notifications=False)
    central.start()
    try:
        q = Queue(keys.job_queue("h1"), connection=r, serializer=JSONSerializer)
        job = q.enqueue(
            "jobs_for_tests.slow_first_attempt",
            "cqt:test:attempts",
            300,
            job_id="slowjob",
            retry=Retry(max=2),
        )
        w1 = procs.worker("h1")
        wait_for(lambda: r.get("cqt:test:attempts") == b"1", 20, what="first attempt running")
        Procs.kill(w1, signal.SIGKILL)  # the worker, mid-job
        horse = int(r.lindex("cqt:test:attempts:pids", 0))
        with contextlib.suppress(ProcessLookupError):
            os.kill(horse, signal.SIGKILL)  # RQ's work horse runs in its own process group
        killed_at = time.monotonic()
        procs.worker("h1")
        wait_for(
            lambda: (
                Job.fetch(job.id, connection=r, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
            ),
            60,
            what="retried job finished",
        )
        assert time.monotonic() - killed_at < 60
        assert r.get("cqt:test:attempts") == b"2"
    finally:
        central.shutdown()


def test_every_job_kind_names_a_body_that_exists() -> None:
    """The core names job bodies by import path; each must resolve to the worker's function."""
    import importlib

    for kind, path in jobs.BODIES.items():
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), kind


def test_a_save_for_a_node_that_is_gone_gives_up_at_once(r: redis.Redis, keys: Keys) -> None:
    """A node that shut down (its liveness key deleted) or died saves nothing more: the job must
    not wait the whole ack timeout for it (it held a worker's warm shutdown for 10 s)."""
    from cloudq.workers import data

    r.hset(keys.node("n9"), mapping={"state": "active", "session": "s9"})  # no alive key: it is gone
    t0 = time.monotonic()
    assert data.save_session(r, keys, "s9", "alice", "n9", final=False, gen=1) == "node did not answer"
    assert time.monotonic() - t0 < data.ACK_TIMEOUT / 4


def test_an_idle_worker_exits_within_five_seconds_of_sigterm(procs: Procs, r: redis.Redis) -> None:
    """RQ's pub/sub thread sleeps up to 60 s between reads and redis-py 8 joins it without a
    bound: a worker stopped between two reads hung for up to a minute (the harness gave up and
    SIGKILLed it after 10 s). Five seconds leaves room for a loaded machine."""
    for _ in range(3):
        w = procs.worker()
        wait_for(lambda: r.scard("rq:workers") >= 1, 20, what="worker registered")
        procs.kill(w, signal.SIGTERM, timeout=5)  # raises TimeoutExpired if it does not exit
        assert w.returncode == 0, procs.output(w)[-2000:]
        wait_for(lambda: r.scard("rq:workers") == 0, 5, what="worker unregistered")


def test_jobs_run_without_a_fork_and_a_hung_or_crashing_job_does_not_take_the_worker_down(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    """One worker process, five jobs in a row: a job that hangs in Python is ended by its timeout
    and the next job runs in the same process (no fork per job); a job that kills the interpreter
    is retried at once by a new work horse; a job that hangs deaf to the timeout's signal is killed
    by the watchdog; the worker lives on and runs the last job."""
    q = Queue(keys.job_queue("h1"), connection=r, serializer=JSONSerializer)
    m = "cqt:test:ran:"
    hang = q.enqueue("jobs_for_tests.hang", m + "hang", job_timeout=1)
    after = q.enqueue("jobs_for_tests.record", m + "after")
    crash = q.enqueue("jobs_for_tests.crash_first_attempt", m + "crash", retry=Retry(max=1))
    deaf = q.enqueue("jobs_for_tests.hang", m + "deaf", True, job_timeout=1)
    last = q.enqueue("jobs_for_tests.record", m + "last")
    t0 = time.monotonic()
    w = procs.worker("h1")

    def status(job: Job) -> JobStatus | None:
        return Job.fetch(job.id, connection=r, serializer=JSONSerializer).get_status()

    wait_for(
        lambda: all(
            status(j) in (JobStatus.FINISHED, JobStatus.FAILED) for j in (hang, after, crash, deaf, last)
        ),
        20,
        what="every job ended",
    )
    took = time.monotonic() - t0
    pid = {k: [int(p) for p in r.lrange(m + k, 0, -1)] for k in ("hang", "after", "crash", "deaf", "last")}
    assert status(hang) == JobStatus.FAILED
    result = Job.fetch(hang.id, connection=r, serializer=JSONSerializer).latest_result()
    assert result is not None and "JobTimeoutException" in (result.exc_string or "")
    assert pid["after"] == pid["hang"], "the job after a timed-out one runs in the same process: no fork"
    assert pid["crash"][0] == pid["hang"][0] and len(pid["crash"]) == 2, pid
    assert pid["crash"][1] != pid["crash"][0], "retried by a new work horse"
    assert status(crash) == JobStatus.FINISHED
    assert status(deaf) == JobStatus.FAILED, "killed by the watchdog (no retries left)"
    assert status(last) == JobStatus.FINISHED and pid["last"][0] != pid["deaf"][0]
    assert w.poll() is None, "the worker itself lives on"
    assert took < 15, (
        f"{took:.1f} s: a crashed job waited for its heartbeat to lapse, or a deaf one for RQ's +60 s"
    )
