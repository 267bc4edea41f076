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
