"""The enqueue side of the cloud server's RQ jobs: queue names, job ids, ``enqueue_*``.

The central server and the job bodies both enqueue (a close dispatches the next queued user's
mount), so this half lives in the core and names the bodies by their import path: the central
server never imports :mod:`cloudq.workers`. The bodies are in ``workers/jobs.py``.

Jobs use RQ's JSON serializer (pickle over a shared Redis would be code execution), have
deterministic ids (``unique=True``: a sweep, a notification and a second central replica
enqueue one job), and carry the session generation: a job whose generation is stale (say a
close racing an online reconnection) changes nothing. Each runs on the queue of the host
that holds the node's workspace; ``any`` when no host is known.
"""

from __future__ import annotations

import logging
import re

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from cloudq.keys import Keys
from cloudq.state import Action, Assignment

log = logging.getLogger(__name__)

ANY_HOST = "any"
JOB_RETRIES = 3
JOB_TIMEOUT = 600
RESULT_TTL = 3600
BODIES = {
    "mount": "cloudq.workers.jobs.mount_job",
    "close": "cloudq.workers.jobs.close_job",
    "save": "cloudq.workers.jobs.save_job",
}
"""Job kind -> the function a worker runs (by import path; see ``workers/jobs.py``)."""


def queue_for(r: redis.Redis, keys: Keys, host: str) -> Queue:
    """The RQ queue of the host that holds a node's workspace (``any`` when unknown)."""
    return Queue(keys.job_queue(host or ANY_HOST), connection=r, serializer=JSONSerializer)


def job_id(keys: Keys, kind: str, sid: str, gen: int, suffix: str = "") -> str:
    """Deterministic id of the job ``kind`` for one session generation."""
    return re.sub(
        r"[^A-Za-z0-9_-]", "_", f"{keys.prefix}{kind}-{sid}-{gen}" + (f"-{suffix}" if suffix else "")
    )


def enqueue(
    r: redis.Redis, keys: Keys, kind: str, sid: str, gen: int, host: str, *args: str, issue: int = 0
) -> bool:
    """Enqueue ``kind`` (``mount``, ``close`` or ``save``) once per (session, generation, issue).

    ``issue`` > 0 numbers a re-issue (the sweep's lease ran out): its own id, so a previous
    run's job hash, which RQ keeps for the result TTL, does not make RQ refuse it.
    """
    suffix = args[0].split("#")[-1] if kind == "save" else (f"r{issue}" if issue > 0 else "")
    try:
        queue_for(r, keys, host).enqueue(
            BODIES[kind],
            keys.prefix,
            sid,
            gen,
            *args,
            job_id=job_id(keys, kind, sid, gen, suffix),
            unique=True,
            retry=Retry(max=JOB_RETRIES),
            job_timeout=JOB_TIMEOUT,
            result_ttl=RESULT_TTL,
            failure_ttl=RESULT_TTL,
        )
    except DuplicateJobError:
        log.info("not enqueued: %s for session %s gen %s issue %s exists already", kind, sid, gen, issue)
        return False
    log.info("enqueued %s for session %s gen %s on host %s", kind, sid, gen, host or ANY_HOST)
    return True


def enqueue_assignment(r: redis.Redis, keys: Keys, a: Assignment) -> None:
    """A node was assigned to a session: mount the user's data on the node's host."""
    host = (r.hget(keys.node(a.node), "host") or b"").decode()
    enqueue(r, keys, "mount", a.sid, a.gen, host, a.node)


def enqueue_action(r: redis.Redis, keys: Keys, a: Action) -> None:
    """Turn a sweep's action (close, mount, save) into its job."""
    if a.action == "close":
        enqueue(r, keys, "close", a.sid, a.gen, a.host, a.reason, issue=a.issue)
    elif a.action == "mount":
        enqueue(r, keys, "mount", a.sid, a.gen, a.host, a.node, issue=a.issue)
    elif a.action == "save":
        enqueue(r, keys, "save", a.sid, a.gen, a.host, a.reason)


def requeue_abandoned(r: redis.Redis, keys: Keys) -> int:
    """Retry jobs whose worker died (run by the central sweeper). Returns the queues checked.

    RQ notices a dead worker's job only when its started-registry entry is older than the job
    heartbeat TTL, and only on a maintenance pass; ``cloudq worker`` keeps that TTL short and
    the central server calls this every few seconds.
    """
    n = 0
    for name in r.smembers("rq:queues"):
        qname = name.decode().removeprefix("rq:queue:")
        if qname.startswith(keys.prefix):
            StartedJobRegistry(qname, connection=r, serializer=JSONSerializer).cleanup()
            n += 1
    return n
