"""``cloudq worker``: an RQ worker on this host's queue and the shared ``any`` queue.

RQ notices a job whose worker died only when the job's entry in the started registry is
older than its heartbeat TTL, which RQ sets to ``job_monitoring_interval + 60`` s, and only
on a maintenance pass (every 10 min by default): an abandoned job waits ~11 min. Here the
TTL is ``job_monitoring_interval + HEARTBEAT_MARGIN`` and the central server's sweeper runs
the started-registry cleanup every few seconds, so a job whose worker was SIGKILLed is
retried within ~15 s.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any

import redis
from rq import Worker
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer

from cloudq.jobs import ANY_HOST, queue_for
from cloudq.keys import Keys
from cloudq.retry import Backoff, passing
from cloudq.state import JobResult
from cloudq.workers.metrics import JobMetrics

log = logging.getLogger(__name__)

MONITORING_INTERVAL = 2
HEARTBEAT_MARGIN = 8
WORKER_TTL = 20
"""RQ derives its blocking dequeue (TTL - 15 = 5 s) and its socket timeout (dequeue + 10 = 15 s)
from this: a half-open connection is noticed within 15 s instead of RQ's default ~7 min."""
UNSUBSCRIBE_WAIT = 1.0
"""Seconds a stopping worker waits for RQ's pub/sub thread (a daemon) before it exits anyway."""
KNOWN_RESULTS = frozenset(JobResult)
"""What the job bodies return (``workers/jobs.py``, ``workers/data.py``): the metric's result label."""


class CloudqWorker(Worker):
    metrics: JobMetrics | None = None

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_monitoring_interval + HEARTBEAT_MARGIN

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """RQ installs its signal handlers only after bootstrap has registered the worker, so a
        SIGTERM in between killed it by the default action (exit -15) and left its registration
        behind: install them first, and undo a half-done bootstrap on a stop request."""
        self._install_signal_handlers()
        try:
            super().bootstrap(*args, **kwargs)
        except StopRequested:
            self.teardown()
            raise

    def unsubscribe(self) -> None:
        """RQ's own version waits for its pub/sub thread without a bound: RQ runs that thread with
        ``sleep_time=60`` and redis-py 8's ``stop()`` joins it with no timeout, so a worker told to
        stop while the thread sat between two reads took up to 60 s to exit. Bounded here; the
        thread is a daemon and its connection is closed either way."""
        if self.pubsub_thread:
            self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
            with contextlib.suppress(redis.RedisError):
                self.pubsub.unsubscribe()
            self.pubsub_thread._running.clear()  # stop() without its unbounded join
            self.pubsub_thread.join(timeout=UNSUBSCRIBE_WAIT)
            with contextlib.suppress(redis.RedisError):
                self.pubsub.close()

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job (in a forked work horse, as RQ does); then, in this process, count it."""
        t0 = time.monotonic()
        try:
            super().execute_job(job, queue)
        finally:
            if self.metrics is not None:
                self.metrics.observe(job_kind(job), job_result(job), time.monotonic() - t0)


def job_kind(job: Job) -> str:
    """``mount``, ``close``, ``save`` (or the function's name for anything else)."""
    name = (job.func_name or "").rpartition(".")[2]
    return name.removesuffix("_job") or "unknown"


def job_result(job: Job) -> str:
    """What the job body returned when it is one of the known outcomes, else RQ's status."""
    try:
        status = job.get_status(refresh=True)
        if status == JobStatus.FINISHED:
            value = job.return_value(refresh=True)
            if isinstance(value, str) and value.startswith("version "):
                return "saved"
            if isinstance(value, str) and value in KNOWN_RESULTS:
                return value.replace(" ", "_")
            return "finished"
        return str(status.value if status is not None else "unknown")
    except redis.RedisError:
        return "unknown"


def make_worker(r: redis.Redis, keys: Keys, host: str, name: str | None = None) -> CloudqWorker:
    # the job bodies (and the store under them) are imported here, once: each forked work horse
    # inherits them instead of importing them again for every job
    import cloudq.workers.jobs  # noqa: F401

    queues = [queue_for(r, keys, host)]
    if host != ANY_HOST:
        queues.append(queue_for(r, keys, ANY_HOST))
    return CloudqWorker(
        queues,
        connection=r,
        serializer=JSONSerializer,
        name=name,
        job_monitoring_interval=MONITORING_INTERVAL,
        maintenance_interval=10,
        worker_ttl=WORKER_TTL,
    )


def run_worker(
    r: redis.Redis,
    keys: Keys,
    host: str,
    name: str | None = None,
    burst: bool = False,
    metrics: JobMetrics | None = None,
) -> None:
    """Run an RQ worker until it is told to stop, starting it again whenever it quit because
    Redis was unreachable or refused a write that passes (:func:`cloudq.retry.passing`: OOM ...):
    RQ's worker quits on a connection error or timeout while a job runs (and on any timeout), and
    raises out of ``work`` when its registration or its teardown is refused, but a cloudq process
    must come back by itself after a Redis restart or once the server has memory again."""
    backoff = Backoff()
    stop = threading.Event()
    while not stop.is_set():
        w: CloudqWorker | None = None
        started = time.monotonic()
        try:
            w = make_worker(r, keys, host, name=name)  # talks to Redis too (CLIENT SETNAME)
            w.metrics = metrics
            w.work(burst=burst, logging_level=logging.getLevelName(logging.getLogger().level))
        except redis.RedisError as exc:
            # unreachable, or an error that passes (OOM: RQ's bootstrap and its teardown write)
            if not passing(exc):
                raise
            log.warning("worker: redis: %s: %s", type(exc).__name__, exc)
        except StopRequested:
            return
        # RQ's own signal handlers record a SIGTERM/SIGINT as a shutdown request
        if w is not None and (
            burst or w._stop_requested or getattr(w, "_shutdown_requested_date", None) is not None
        ):
            return
        if time.monotonic() - started > WORKER_TTL:
            # it ran: a new failure starts the backoff over. Not on a PING that answers: a server
            # out of memory answers PING and refuses the next worker's registration (a busy loop)
            backoff.reset()
        log.warning("worker quit on a Redis error; starting again in <%.1fs", backoff.peek())
        # until the next worker installs its handlers, a signal ends the loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        backoff.wait(stop)
