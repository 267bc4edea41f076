"""``cloudq worker``: an RQ worker on this host's queue and the shared ``any`` queue.

RQ notices a job whose worker died only when the job's entry in the started registry is
older than its heartbeat TTL, which RQ sets to ``job_monitoring_interval + 60`` s, and only
on a maintenance pass (every 10 min by default): an abandoned job waits ~11 min. Here the
TTL is ``job_monitoring_interval + HEARTBEAT_MARGIN`` and the central server's sweeper runs
the started-registry cleanup every few seconds, so a job whose worker was SIGKILLed is
retried within ~15 s.

Jobs run without a fork per job: ``cloudq worker`` is a small supervisor (:func:`supervise`)
that forks one long-lived work horse, a :class:`CloudqWorker` (RQ's ``SimpleWorker``: each job
runs in the horse's main thread), and keeps what a fork per job gave:

- a job that hangs in Python code is ended by RQ's death penalty (``SIGALRM`` at the job's
  timeout: ``JobTimeoutException``, RQ's failure handling and retries) and the horse takes the
  next job;
- a job that hangs where that signal cannot reach it (a C call holding the GIL, signals
  blocked) is killed by the supervisor's watchdog: the horse reports each job's deadline over a
  pipe, and the supervisor SIGKILLs it ``WATCHDOG_GRACE`` s after the timeout;
- a job that takes the horse down (``os._exit``, a segfault, the watchdog) costs the horse, not
  the worker: the supervisor starts a new horse, which hands that job at once to RQ's abandoned-job
  handling (retried while it has retries left), instead of after its heartbeat lapses;
- a killed worker (the supervisor: the horse dies with it, ``PR_SET_PDEATHSIG``) leaves its job
  to the started-registry cleanup above, as before.

A job's started-registry heartbeat is kept by a thread in the horse while the job runs (a forked
worker's parent did it). ``cloudq worker --fork-per-job`` runs RQ's forking worker instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import redis
from rq import SimpleWorker, Worker
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

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
WATCHDOG_GRACE = 5.0
"""Seconds past a job's timeout (at most the timeout itself) before the supervisor kills a horse
that RQ's own ``SIGALRM`` did not stop."""
RESTART_WAIT = (0.2, 5.0)
"""Backoff (first, cap) between two horses after a job took one down."""
KNOWN_RESULTS = frozenset(JobResult)
"""What the job bodies return (``workers/jobs.py``, ``workers/data.py``): the metric's result label."""


class _CloudqWorkerBase:
    """What both worker kinds share (RQ's worker class comes after this in their bases)."""

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
        """Run the job (as the worker class does it); then, in this process, count it."""
        t0 = time.monotonic()
        try:
            self._run_job(job, queue)
        finally:
            if self.metrics is not None:
                self.metrics.observe(job_kind(job), job_result(job), time.monotonic() - t0)

    def _run_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)  # type: ignore[misc]


class ForkingWorker(_CloudqWorkerBase, Worker):
    """RQ's own worker: a work horse forked for each job (``cloudq worker --fork-per-job``)."""


class CloudqWorker(_CloudqWorkerBase, SimpleWorker):
    """Runs each job in this process (no fork): RQ's ``SimpleWorker`` (its death penalty, SIGALRM,
    ends a job at its timeout), plus the job's heartbeat from a thread while it runs and the
    deadline told to the supervisor's watchdog (:func:`supervise`)."""

    def _run_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)  # type: ignore[attr-defined]
        timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT  # type: ignore[attr-defined]
        _tell_watchdog(
            b"B %.3f %s %s\n"
            % (
                time.monotonic() + timeout + watchdog_grace(timeout) if timeout > 0 else float("inf"),
                queue.name.encode(),
                execution.composite_key.encode(),
            )
        )
        stop = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job, execution, stop), name="job-heartbeat", daemon=True
        )
        beat.start()
        try:
            self.perform_job(job, queue, execution)  # type: ignore[attr-defined]
        finally:
            stop.set()
            beat.join()
            _tell_watchdog(b"E\n")
        self.set_state(WorkerStatus.IDLE)  # type: ignore[attr-defined]

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        """What a forking worker's parent does while its horse runs: keep the worker, the job and
        its started-registry entry alive (RQ's ``maintain_heartbeats``), so a job that runs long is
        not taken for abandoned, and one whose horse died is (its entry lapses)."""
        while not stop.wait(self.job_monitoring_interval):  # type: ignore[attr-defined]
            try:
                self.maintain_heartbeats(job, execution)  # type: ignore[attr-defined]
            except redis.RedisError as exc:  # the next beat tries again; the TTL bounds the rest
                log.warning("job %s: heartbeat failed: %s", job.id, exc)


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


def make_worker(
    r: redis.Redis, keys: Keys, host: str, name: str | None = None, fork_per_job: bool = False
) -> CloudqWorker | ForkingWorker:
    # the job bodies (and the store under them) are imported here, once (a forked work horse
    # inherits them instead of importing them again for every job)
    import cloudq.workers.jobs  # noqa: F401

    queues = [queue_for(r, keys, host)]
    if host != ANY_HOST:
        queues.append(queue_for(r, keys, ANY_HOST))
    return (ForkingWorker if fork_per_job else CloudqWorker)(
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
    fork_per_job: bool = False,
) -> None:
    """Run an RQ worker until it is told to stop, starting it again whenever it quit because
    Redis was unreachable or refused a write that passes (:func:`cloudq.retry.passing`: OOM ...):
    RQ's worker quits on a connection error or timeout while a job runs (and on any timeout), and
    raises out of ``work`` when its registration or its teardown is refused, but a cloudq process
    must come back by itself after a Redis restart or once the server has memory again."""
    backoff = Backoff()
    stop = threading.Event()
    retry_abandoned(r)
    while not stop.is_set():
        w: CloudqWorker | ForkingWorker | None = None
        started = time.monotonic()
        try:
            w = make_worker(r, keys, host, name=name, fork_per_job=fork_per_job)  # CLIENT SETNAME too
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


# --------------------------------------------------------------------------------------------------
# The supervisor: one long-lived work horse, a watchdog on its jobs' deadlines

_PR_SET_PDEATHSIG = 1
_watchdog_fd: int | None = None
"""In a supervised horse: the pipe to the supervisor (``B <deadline> <queue> <execution>`` when a
job starts, ``E`` when it ends)."""
_abandoned: tuple[str, str] | None = None
"""In a new horse: (queue, execution) of the job the previous horse died running."""


def watchdog_grace(timeout: float) -> float:
    return min(WATCHDOG_GRACE, max(1.0, float(timeout)))


def _tell_watchdog(msg: bytes) -> None:
    if _watchdog_fd is not None:
        try:
            os.write(_watchdog_fd, msg)
        except OSError as exc:  # the supervisor is gone: PR_SET_PDEATHSIG ends this process too
            log.warning("cannot reach the supervisor: %s", exc)


def retry_abandoned(r: redis.Redis) -> None:
    """In a new horse: hand the job the previous horse died running to RQ's abandoned-job handling
    now (retried while it has retries left, else failed), instead of when its heartbeat lapses.
    Its started-registry entry is made due (only if it is still there) and the registry cleaned."""
    global _abandoned
    if _abandoned is None:
        return
    qname, execution = _abandoned
    _abandoned = None
    try:
        registry = StartedJobRegistry(qname, connection=r, serializer=JSONSerializer)
        if r.zadd(registry.key, {execution: 1}, xx=True, ch=True):
            log.warning("job %s: its work horse died running it; handing it to RQ's retry", execution)
            registry.cleanup()
    except redis.RedisError as exc:  # the central sweeper's cleanup does it once the entry lapses
        log.warning("cannot retry the job %s now: %s", execution, exc)


def _die_with_parent() -> None:
    """SIGKILL this process when the supervisor dies (even by SIGKILL): no horse runs unwatched."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _horse_main(horse: Callable[[], None], wfd: int) -> None:
    """The forked horse: runs ``horse`` and never returns into the supervisor's code."""
    global _watchdog_fd
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # until RQ installs its own
        os.setpgid(0, 0)  # signals to the worker's group reach the supervisor, which forwards them
        _die_with_parent()
        _watchdog_fd = wfd
        horse()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def supervise(horse: Callable[[], None]) -> int:
    """Run ``horse`` (an RQ worker's whole life: connect, work) in one forked, long-lived process;
    return its exit status. SIGTERM/SIGINT are passed on to it (RQ's warm shutdown). When a job
    takes it down (it died, or exited, in the middle of a job), or the watchdog killed it because a
    job ran ``watchdog_grace`` past its timeout, start a new one. Call before opening connections
    or threads: the horse is forked."""
    global _abandoned
    me = os.getpid()
    horse_pid = 0
    stopping = False

    def forward(sig: int, _frame: Any) -> None:
        nonlocal stopping
        if os.getpid() != me:  # a horse between fork and its own handlers
            return
        stopping = True
        if horse_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(horse_pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    backoff = Backoff(*RESTART_WAIT)
    while True:
        rfd, wfd = os.pipe()
        horse_pid = os.fork()
        if horse_pid == 0:
            os.close(rfd)
            _horse_main(horse, wfd)
        os.close(wfd)
        job: tuple[str, str] | None = None
        deadline = float("inf")
        killed = False
        pending = b""
        started = time.monotonic()
        with os.fdopen(rfd, "rb", buffering=0) as pipe:
            while True:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([pipe], [], [], None if left == float("inf") else max(0.0, left))
                if not ready:
                    log.error(
                        "worker: job %s is still running past its timeout: killing its work horse %d",
                        job[1] if job else "?",
                        horse_pid,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(horse_pid, signal.SIGKILL)
                    killed, deadline = True, float("inf")
                    continue
                data = pipe.read(4096)
                if not data:
                    break  # the horse is gone
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    parts = line.split()
                    if parts[:1] == [b"B"] and len(parts) == 4:
                        deadline = float(parts[1])
                        job = (parts[2].decode(), parts[3].decode())
                    elif parts[:1] == [b"E"]:
                        job, deadline = None, float("inf")
        _, status = os.waitpid(horse_pid, 0)
        code = os.waitstatus_to_exitcode(status)
        horse_pid = 0
        if stopping:
            return max(code, 0)
        if job is None and not killed:
            return code  # it ended by itself (burst, a stop, a fatal error): so does the worker
        log.error(
            "worker: the work horse %s during job %s (exit status %s); starting a new one",
            "was killed" if killed else "died",
            job[1] if job else "?",
            code,
        )
        _abandoned = job
        if time.monotonic() - started > 60:
            backoff.reset()
        end = time.monotonic() + backoff.next()
        while time.monotonic() < end:
            if stopping:
                return 0
            time.sleep(0.05)
