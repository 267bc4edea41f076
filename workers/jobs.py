"""RQ job bodies of the cloud server: mount a user's data and start the app, save, close.

The enqueue side (queue names, ids, ``enqueue_*``) is :mod:`cloudq.jobs` in the core; it names
these functions by import path. Every body checks the session generation it was given: a stale
job (say a close racing an online reconnection) changes nothing.
"""

from __future__ import annotations

import logging

import redis
from rq import get_current_job

from cloudq.keys import Keys
from cloudq.media import FIELD as MEDIA_FIELD
from cloudq.media import connect_like
from cloudq.messages import Control, pack_control
from cloudq.state import CloseReason, JobResult, StateMachine, with_detail
from cloudq.workers import data

log = logging.getLogger(__name__)


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
        return JobResult.STALE
    try:
        data.mount_session(r, keys, sid, s[b"user"].decode(), node)
    except data.DataError as exc:
        log.error("mount %s gen %s failed: %s", sid, gen, exc)
        fail_session(r, keys, sid, gen, with_detail(CloseReason.MOUNT_FAILED, str(exc)))
        return JobResult.FAILED
    r.xadd(keys.node_control(node), pack_control(Control("start", sid, gen)), maxlen=1000, approximate=True)
    return JobResult.STARTED


def close_job(prefix: str, sid: str, gen: int, reason: str) -> str:
    """Close a session: node stops the app (``closing``), user data saved, node freed."""
    r = _conn()
    keys = Keys(prefix)
    sm = StateMachine(r, keys)
    status, node = sm.close_begin(sid, gen, reason)
    if status != "ok":
        log.info("close %s gen %s (%s): %s, nothing to do", sid, gen, reason, status)
        if status == "gone" and r.hget(keys.session(sid), "state") == b"closed":
            release_streams(r, keys, sid)  # a retry of a close cut off after its release: idempotent
        return status
    user = (r.hget(keys.session(sid), "user") or b"").decode()
    try:
        saved = data.save_session(r, keys, sid, user, node, final=True, gen=gen)
    except data.DataError as exc:
        saved = str(exc)  # recorded as an event; the last good version stands
    log.info("close %s: final save: %s", sid, saved)
    freed = sm.release(sid, gen)
    release_streams(r, keys, sid)
    data.unmount(r, keys, user, sid)
    log.info("closed session %s (%s); node %s freed", sid, reason, freed or "-")
    replicated(r)
    wake_central(r, keys)
    return JobResult.CLOSED


def fail_session(r: redis.Redis, keys: Keys, sid: str, gen: int, reason: str) -> None:
    """End a session that cannot start (e.g. its data cannot be mounted): node back to the pool."""
    sm = StateMachine(r, keys)
    status, _ = sm.close_begin(sid, gen, reason)
    if status == "ok":
        sm.release(sid, gen)
        release_streams(r, keys, sid)
        user = (r.hget(keys.session(sid), "user") or b"").decode()
        data.unmount(r, keys, user, sid)
        wake_central(r, keys)


def release_streams(r: redis.Redis, keys: Keys, sid: str) -> None:
    """After ``release``: the closed session's streams, where they are (its media server, as this
    worker's own user, or this server). A media server that is down keeps them until the central
    server sees it again (:meth:`cloudq.central.media.MediaServers.check` expires what it finds
    of closed sessions)."""
    url, reason = (v.decode() if v else "" for v in r.hmget(keys.session(sid), MEDIA_FIELD, "close_reason"))
    m = connect_like(url, r) if url else r
    try:
        StateMachine(m, keys).release_streams(sid, reason)
    except redis.RedisError as exc:
        if m is r:
            raise
        log.warning("session %s: its streams on %s not released now: %s", sid, url, exc)
    finally:
        if m is not r:
            m.close()


def replicated(r: redis.Redis, timeout_ms: int = 1000) -> None:
    """A close or a save is recorded: with replicas, wait until one has it (``WAIT 1``), so a
    failover cannot lose it. Nothing to wait for without replicas."""
    try:
        if (
            int(r.info("replication").get("connected_slaves", 0))
            and r.execute_command("WAIT", 1, timeout_ms) < 1
        ):
            log.warning("no replica acknowledged the record within %d ms", timeout_ms)
    except redis.ResponseError as exc:  # a user that may not run INFO/WAIT: nothing to wait for
        log.debug("no replica wait: %s", exc)


def wake_central(r: redis.Redis, keys: Keys) -> None:
    """A node is free: the central servers give it to the next queued user now (they create its
    session's Redis user, which a worker may not), not at their next timed pass."""
    try:
        r.publish(keys.wake, "free")
    except redis.ResponseError as exc:  # e.g. a worker user from an older ACL file: the timed pass does it
        log.warning("cannot wake the central servers (%s): the queue moves at their next pass", exc)


def save_job(prefix: str, sid: str, gen: int, why: str) -> str:
    """Save a live session's data (autosave, or the node went to sleep)."""
    r = _conn()
    keys = Keys(prefix)
    s = r.hgetall(keys.session(sid))
    if s.get(b"state") in (None, b"closed", b"starting") or s.get(b"close_reason"):
        return JobResult.NOT_LIVE
    node = s.get(b"node", b"").decode()
    if not node or r.hget(keys.node(node), "session") != sid.encode():
        return JobResult.NO_NODE
    saved = data.save_session(r, keys, sid, s[b"user"].decode(), node, final=False, gen=int(s[b"gen"]))
    replicated(r)
    return saved
