"""The data management module's steps inside the session lifecycle.

- ``mount_session``: before a node starts its app, restore the user's newest good version from
  the store into the node's workspace (falling back to the one before if the newest is corrupt;
  a new user starts empty). A user's data is mounted on at most one node at a time.
- ``save_session``: ask the node to write its app's state into the workspace, wait for its
  acknowledgement, then save the workspace as a new version. Runs on close (final), on sleep and
  periodically while active (only when the node says something changed). Two saves of one user
  never run at once: a lock with a TTL and a fencing token.

Where things live comes from the environment of the worker (``cloudq worker --store --workspace``
set it): ``CLOUDQ_STORE`` (the store root, shared by all hosts) and ``CLOUDQ_WORKSPACE`` (this
host's node workspaces).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import redis

from cloudq.keys import Keys
from cloudq.messages import Control, pack_control
from cloudq.retry import Backoff
from cloudq.workers.store import DirectoryStore, NoGoodVersion, NoVersions, StoreError

log = logging.getLogger(__name__)

ACK_TIMEOUT = 10.0
MOUNT_WAIT = 60.0  # for the user's previous session to finish saving
SAVE_LEASE = 10.0
"""The save lock is a lease (s; ``$CLOUDQ_SAVE_LEASE``, ``cloudq worker --save-lease``): its holder
renews it every third of this while it saves, so a holder that died (kill -9, a work horse killed
with its worker, a Redis restart as it released) holds up the user's next save or mount for at most
this long. 0 = no lapse (a dead holder's lock stays until an operator deletes it)."""


def save_lease() -> float:
    """The save lock's lease in seconds (:data:`SAVE_LEASE`, or ``$CLOUDQ_SAVE_LEASE``)."""
    try:
        return max(0.0, float(os.environ.get("CLOUDQ_SAVE_LEASE", SAVE_LEASE)))
    except ValueError:
        return SAVE_LEASE


_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
QUOTA_BYTES = 100 * 2**20


class DataError(Exception):
    """A mount or save that cannot be done; the message is fit for the events stream."""


def default_root(kind: str) -> Path:
    return Path(tempfile.gettempdir()) / f"cloudq-{kind}"


def store_root() -> Path:
    return Path(os.environ.get("CLOUDQ_STORE") or default_root("store"))


def workspace_root() -> Path:
    """Root of this host's node workspaces: ``$CLOUDQ_WORKSPACE``, else ``<tmp>/cloudq-workspace``
    (the one default: nodes, through :func:`cloudq.workers.streamer.default_workspace`, and jobs)."""
    return Path(os.environ.get("CLOUDQ_WORKSPACE") or default_root("workspace"))


def open_store(root: str | Path | None = None) -> DirectoryStore:
    quota = int(float(os.environ.get("CLOUDQ_QUOTA_MIB", QUOTA_BYTES / 2**20)) * 2**20)
    return DirectoryStore(root or store_root(), quota_bytes=quota)


def workspace_dir(root: str | Path, node_id: str) -> Path:
    """The directory a node's app reads and writes its user's data in."""
    return Path(root) / node_id / "data"


def _now(r: redis.Redis) -> str:
    sec, usec = r.time()
    return f"{sec + usec / 1e6:.3f}"


def _event(r: redis.Redis, keys: Keys, obj: str, what: str, reason: str, **extra: str) -> None:
    r.xadd(
        keys.events,
        {"t": _now(r), "obj": obj, "from": "", "to": what, "reason": reason, **extra},
        maxlen=10000,
        approximate=True,
    )


def mount_session(r: redis.Redis, keys: Keys, sid: str, user: str, node: str) -> None:
    """Restore ``user``'s data into ``node``'s workspace. Raises DataError if it cannot."""
    # one node at a time: a session still closing (saving) must finish first
    end = time.monotonic() + MOUNT_WAIT
    while True:
        holder = (r.get(keys.user_mounted(user)) or b"").decode()
        free = not holder or holder == sid or r.hget(keys.session(holder), "state") in (None, b"closed")
        if free and not r.exists(keys.save_lock(user)):  # and no save of the user's data under way
            break
        if time.monotonic() >= end:
            raise DataError(f"data of {user} is still mounted by session {holder}")
        time.sleep(0.05)
    r.set(keys.user_mounted(user), sid)
    dest = workspace_dir(workspace_root(), node)
    dest.parent.mkdir(parents=True, exist_ok=True)
    store = open_store()
    try:
        # versions saved before an account of this name was deleted (`user del` without
        # --purge) belong to that account: a new account of the same name does not inherit them
        deleted = _account_deleted(r, keys, user)
        versions = store.versions(user) if deleted else []
        if versions and all(_version_time(v.created) < deleted for v in versions):
            _event(
                r, keys, f"session:{sid}", "mounted", f"older versions of {user} belong to a deleted account"
            )
            raise NoVersions(user)
        info = store.restore(user, dest)
    except NoVersions:
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        _event(r, keys, f"session:{sid}", "mounted", f"new user {user}: empty data on node {node}")
        return
    except NoGoodVersion as exc:
        raise DataError(f"no good saved version of {user}'s data: {exc}") from None
    except StoreError as exc:
        raise DataError(f"cannot restore {user}'s data: {exc}") from None
    note = f"version {info.version} of {user} on node {node}"
    if info.fell_back_from:
        note += f" (version {info.fell_back_from} is corrupt: fell back)"
        log.error("mount %s: %s", sid, note)
    _event(r, keys, f"session:{sid}", "mounted", note)


def _ask_node(
    r: redis.Redis, keys: Keys, node: str, sid: str, gen: int, cmd: str, field: str, want: str
) -> str:
    """Send ``cmd`` and wait (bounded by ``ACK_TIMEOUT``, and by the node's liveness) until the
    node's hash ``field`` starts with ``want``; ``""`` if it did not answer."""
    if cmd:
        r.xadd(
            keys.node_control(node), pack_control(Control(cmd, sid, gen, want)), maxlen=1000, approximate=True
        )
    end = time.monotonic() + ACK_TIMEOUT
    while time.monotonic() < end:
        pipe = r.pipeline(transaction=False)  # one round trip per look, not three
        pipe.hmget(keys.node(node), field, "state")
        pipe.exists(keys.node_alive(node))
        (raw, state), alive = pipe.execute()
        v = (raw or b"").decode()
        if v.split("|")[0] == want:
            return v
        if state == b"offline" or not alive:
            return ""  # the node is gone (offline, shut down, or its liveness lapsed): nobody will answer
        time.sleep(0.02)
    return ""


def save_session(
    r: redis.Redis, keys: Keys, sid: str, user: str, node: str, final: bool, gen: int = 0
) -> str:
    """Save the node's workspace for ``user`` as a new version; returns what happened."""
    if not node:
        return "no node"  # its node died: the last saved version stands
    if final:
        # close_begin sent `stop`: the node writes the app's state and acknowledges
        ack = _ask_node(r, keys, node, sid, gen, "", "stopped", f"{sid}:{gen}")
        if not ack:
            log.warning("save %s: node %s did not acknowledge stop; saving its workspace as it is", sid, node)
    else:
        ref = uuid.uuid4().hex[:16]
        ack = _ask_node(r, keys, node, sid, gen, "flush", "flushed", ref)
        if not ack:
            return "node did not answer"
        if ack.endswith("|clean"):
            return "unchanged"
    # the workspace holds what the app had when the node acknowledged: the version is "as of" then
    # (under load the store can end seconds later; input after this moment is not in it)
    asof = _now(r)
    return store_workspace(
        r,
        keys,
        sid,
        user,
        workspace_dir(workspace_root(), node),
        "final" if final else "save",
        wait=final,
        asof=asof,
    )


def store_workspace(
    r: redis.Redis,
    keys: Keys,
    sid: str,
    user: str,
    src: Path,
    label: str,
    wait: bool = True,
    require_marker: bool = True,
    asof: str | None = None,
) -> str:
    """Save the workspace ``src`` as a new version of ``user``'s data, under the user's save lock.

    Only the workspace that ``sid`` mounted is saved: if the user's mount marker names another
    session, ``src`` may hold someone else's files (or an older copy) and nothing is written.
    (``require_marker=False`` only for a node that knows itself what it mounted, when a server
    restart lost the marker.) ``asof`` (server time, when the node acknowledged its flush) goes into
    the ``saved`` event: the version holds the app's state as of then.
    """
    if not user:
        return "no user"
    holder = (r.get(keys.user_mounted(user)) or b"").decode()
    if holder != sid and (require_marker or holder):
        log.warning("save %s: %s's data is mounted by %r, not this session; not saved", sid, user, holder)
        return "not mounted by this session"
    fence = r.incr(keys.save_fence(user))
    lock = keys.save_lock(user)
    end = time.monotonic() + (ACK_TIMEOUT * 6 if wait else 0)
    lease_ms = int(save_lease() * 1000) or None
    while not r.set(lock, fence, nx=True, px=lease_ms):
        if time.monotonic() >= end:
            return "another save is running"
        time.sleep(0.05)
    stop = threading.Event()

    def renew() -> None:
        if lease_ms is None:
            return  # no lease: nothing to renew
        while not stop.wait(lease_ms / 3000):
            try:
                r.eval(_RENEW, 1, lock, fence, lease_ms)
            except redis.RedisError as exc:  # the next renewal tries again; the TTL bounds the rest
                log.warning("save %s: could not renew the save lock (%s)", sid, exc)

    lease = threading.Thread(target=renew, name=f"save-lease-{sid}", daemon=True)
    lease.start()
    try:
        store = open_store()
        same = store.matches_newest(user, src)
        if same is not None:
            # nothing changed since the newest version (the one mounted, or saved since): no new one
            _event(r, keys, f"session:{sid}", "unchanged", f"{user}'s data is version {same} ({label})")
            return "unchanged"
        try:
            info = store.save(user, src)
        except StoreError as exc:
            _event(r, keys, f"session:{sid}", "save_failed", str(exc))
            raise DataError(f"saving {user}'s data failed: {exc}") from None
        if r.get(lock) != str(fence).encode():
            log.error("save %s: lock lost during the save (fence %s)", sid, fence)
        _event(
            r,
            keys,
            f"session:{sid}",
            "saved",
            f"version {info.version} of {user} ({label})",
            **({"asof": asof} if asof else {}),
        )
        return f"version {info.version}"
    finally:
        stop.set()
        lease.join()
        _release(r, lock, fence, sid)


def _release(r: redis.Redis, lock: str, fence: int, sid: str) -> None:
    """Release only our own lock (fencing token); through a Redis blip, retried until it would
    have lapsed anyway."""
    end, backoff = time.monotonic() + (save_lease() or ACK_TIMEOUT), Backoff(0.05, 1.0)
    while True:
        try:
            _delete_if(r, lock, str(fence))
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= end:
                log.warning("save %s: could not release the save lock (%s); it lapses by itself", sid, exc)
                return
            time.sleep(backoff.next())


PURGE_WAIT = 60.0


def purge_user_data(r: redis.Redis, keys: Keys, user: str, sid: str, root: str | Path | None = None) -> None:
    """Delete every stored version of ``user``'s data (``cloudq user del --purge``), after the
    closing session ``sid`` (if any) has finished its final save. Raises DataError."""
    end = time.monotonic() + PURGE_WAIT
    while sid and r.hget(keys.session(sid), "state") not in (None, b"closed"):
        if time.monotonic() >= end:
            raise DataError(f"session {sid} of {user} did not close within {PURGE_WAIT:.0f} s; data kept")
        time.sleep(0.1)
    store = open_store(root)
    try:
        udir = store.user_dir(user)
    except StoreError as exc:
        raise DataError(str(exc)) from None
    shutil.rmtree(udir, ignore_errors=True)
    r.delete(keys.user_mounted(user), keys.save_fence(user), keys.user_deleted(user))
    _event(r, keys, f"user:{user}", "purged", "stored data deleted")


def _account_deleted(r: redis.Redis, keys: Keys, user: str) -> float:
    """When an earlier account of this name was deleted (0 = never)."""
    try:
        return float(r.get(keys.user_deleted(user)) or 0)
    except ValueError:
        return 0.0


def _version_time(created: str) -> float:
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _delete_if(r: redis.Redis, key: str, value: str) -> None:
    """Delete ``key`` only if it still holds ``value`` (a lock or mount we own)."""
    r.eval(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        1,
        key,
        value,
    )


def unmount(r: redis.Redis, keys: Keys, user: str, sid: str) -> None:
    """The user's data is no longer mounted by ``sid``."""
    _delete_if(r, keys.user_mounted(user), sid)
