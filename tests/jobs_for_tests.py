"""Job bodies for tests (importable by worker processes: tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import os
import time

from rq import get_current_job


def slow_first_attempt(marker: str, hold: float) -> str:
    """Counts attempts in Redis; the first one blocks ``hold`` s (long enough to be killed)."""
    job = get_current_job()
    assert job is not None
    attempt = job.connection.incr(marker)
    job.connection.rpush(marker + ":pids", os.getpid())  # so the test can reap a killed worker's horse
    if attempt == 1:
        time.sleep(hold)
    return f"done on attempt {attempt}"


def record(marker: str) -> int:
    """Records which process ran it (``marker`` list); returns that pid."""
    job = get_current_job()
    assert job is not None
    job.connection.rpush(marker, os.getpid())
    return os.getpid()


def hang(marker: str, deaf: bool = False) -> None:
    """Hangs. ``deaf``: with SIGALRM blocked, as in a C call that never returns to Python, so RQ's
    death penalty cannot end it."""
    import signal

    record(marker)
    if deaf:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(3600)


def crash_first_attempt(marker: str) -> int:
    """Takes the interpreter down (``os._exit``) on its first attempt."""
    pid = record(marker)
    job = get_current_job()
    assert job is not None
    if job.connection.llen(marker) == 1:
        os._exit(1)
    return pid
