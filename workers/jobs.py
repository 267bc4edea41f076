"""RQ jobs of the cloud server: mount a user's data and start the app, close a session.

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
from rq import Queue, Retry, get_current_job
from rq.exceptions import DuplicateJobError
from rq.serializers import JSONSerializer

from cloudq.keys import Keys
from cloudq.messages import Control, pack_control
from cloudq.state import Action, Assignment, StateMachine
from cloudq.workers import data

log = logging.getLogger(__name__)

ANY_HOST = "any"
JOB_RETRIES = 3
JOB_TIMEOUT = 600
RESULT_TTL = 3600


def queue_for(r: redis.Redis, keys: Keys, host: str) -> Queue:
    return Queue(keys.job_queue(host or ANY_HOST), connection=r, serializer=JSONSerializer)


def _job_id(keys: Keys, kind: str, sid: str, gen: int) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{keys.prefix}{kind}-{sid}-{gen}")


def enqueue(r: redis.Redis, keys: Keys, kind: str, sid: str, gen: int, host: str, *args: str) -> bool:
    """Enqueue ``kind`` (``mount`` or ``close``) once per (session, generation)."""
    func = {"mount": mount_job, "close": close_job, "save": save_job}[kind]
    try:
        queue_for(r, keys, host).enqueue(
            func,
            keys.prefix,
            sid,
            gen,
            *args,
            job_id=_job_id(keys, kind, sid, gen) + (f"-{args[0].split('#')[-1]}" if kind == "save" else ""),
            unique=True,
            retry=Retry(max=JOB_RETRIES),
            job_timeout=JOB_TIMEOUT,
            result_ttl=RESULT_TTL,
            failure_ttl=RESULT_TTL,
        )
    except DuplicateJobError:
        return False
    log.info("enqueued %s for session %s gen %s on host %s", kind, sid, gen, host or ANY_HOST)
    return True


def enqueue_assignment(r: redis.Redis, keys: Keys, a: Assignment) -> None:
    host = (r.hget(keys.node(a.node), "host") or b"").decode()
    enqueue(r, keys, "mount", a.sid, a.gen, host, a.node)


def enqueue_action(r: redis.Redis, keys: Keys, a: Action) -> None:
    if a.action == "close":
        enqueue(r, keys, "close", a.sid, a.gen, a.host, a.reason)
    elif a.action == "mount":
        enqueue(r, keys, "mount", a.sid, a.gen, a.host, a.node)
    elif a.action == "save":
        enqueue(r, keys, "save", a.sid, a.gen, a.host, a.reason)


def _conn() -> redis.Redis:
    job = get_current_job()
    assert job is not None, "must run inside an RQ job"
    return job.connection


def mount_job(prefix: str, sid: str, gen: int, node: str) -> str:
    """Restore the user's data into the node's workspace, then tell the node to start."""
    r = _conn()
    keys = Keys(prefix)
    s = r.hgetall(keys.session(sid))
    if s.get(b"state") != b"starting" or int(s.get(b"gen", 0)) != gen or s.get(b"node", b"").decode() != node:
        log.info("mount %s gen %s: stale, nothing to do", sid, gen)
        return "stale"
    try:
        data.mount_session(r, keys, sid, s[b"user"].decode(), node)
    except data.DataError as exc:
        log.error("mount %s gen %s failed: %s", sid, gen, exc)
        fail_session(r, keys, sid, gen, f"mount_failed: {exc}")
        return "failed"
    r.xadd(keys.node_control(node), pack_control(Control("start", sid, gen)), maxlen=1000, approximate=True)
    return "started"


def close_job(prefix: str, sid: str, gen: int, reason: str) -> str:
    """Close a session: node stops the app (``closing``), user data saved, node freed."""
    r = _conn()
    keys = Keys(prefix)
    sm = StateMachine(r, keys)
    status, node = sm.close_begin(sid, gen, reason)
    if status != "ok":
        log.info("close %s gen %s (%s): %s, nothing to do", sid, gen, reason, status)
        return status
    user = (r.hget(keys.session(sid), "user") or b"").decode()
    try:
        saved = data.save_session(r, keys, sid, user, node, final=True, gen=gen)
    except data.DataError as exc:
        saved = str(exc)  # recorded as an event; the last good version stands
    log.info("close %s: final save: %s", sid, saved)
    freed = sm.release(sid, gen)
    data.unmount(r, keys, user, sid)
    log.info("closed session %s (%s); node %s freed", sid, reason, freed or "-")
    for a in sm.dispatch():
        enqueue_assignment(r, keys, a)
    return "closed"


def fail_session(r: redis.Redis, keys: Keys, sid: str, gen: int, reason: str) -> None:
    """End a session that cannot start (e.g. its data cannot be mounted): node back to the pool."""
    sm = StateMachine(r, keys)
    status, _ = sm.close_begin(sid, gen, reason)
    if status == "ok":
        sm.release(sid, gen)
        user = (r.hget(keys.session(sid), "user") or b"").decode()
        data.unmount(r, keys, user, sid)
        for a in sm.dispatch():
            enqueue_assignment(r, keys, a)


def save_job(prefix: str, sid: str, gen: int, why: str) -> str:
    """Save a live session's data (autosave, or the node went to sleep)."""
    r = _conn()
    keys = Keys(prefix)
    s = r.hgetall(keys.session(sid))
    if s.get(b"state") in (None, b"closed", b"starting") or s.get(b"close_reason"):
        return "not live"
    node = s.get(b"node", b"").decode()
    if not node or r.hget(keys.node(node), "session") != sid.encode():
        return "no node"
    return data.save_session(r, keys, sid, s[b"user"].decode(), node, final=False, gen=int(s[b"gen"]))
