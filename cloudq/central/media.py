"""The central server's side of the media servers (:mod:`cloudq.media`): their session users and
whether they answer.

Session ACL users are per server (``ACL SETUSER`` is not replicated, and a media server is
another server anyway), so each session's user is created on its media server as well as on the
control server, with the same rights (:func:`cloudq.central.acl.session_rules`: the session's own
streams only) and the same password hash; it goes from both. The role users (node, gateway) come
from the shared ACL file every server loads.

:meth:`MediaServers.watch` runs in a thread of its own (a server that hangs must not hold the
sweeper): every ``every`` s a ``SET media:mark NX`` on each server. A server that does not
answer is put in the control plane's ``media:down`` set (new sessions are placed elsewhere); one
that answers again, or answers without the mark (a restart that lost its users), gets every
live session user placed on it re-created (from the ``acl`` hash the session hash keeps) and
leaves the set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from cloudq.connection import connect, without_credentials
from cloudq.keys import Keys
from cloudq.media import FIELD, connect_like
from cloudq.tokens import SESSION_ACL_PREFIX, session_acl_user

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0
"""Seconds between two looks at each media server (``cloudq central --media-check``)."""
TIMEOUT = 2.0
"""Socket timeout towards a media server (s): a hung one delays a login by at most this."""

STALE_KEEP_MS = 60_000
"""A stream of a session that ended while its media server was away goes this long after its return."""

SetUser = Callable[[redis.Redis, str, str, str], None]
"""``(server, name, password hash, sid)``: create one session user on a server."""


class MediaServers:
    """The media servers of a deployment, as the central server reaches them."""

    def __init__(self, urls: list[str], keys: Keys, control: redis.Redis, setuser: SetUser) -> None:
        self.keys = keys
        self.control = control
        self.setuser = setuser
        self.clients: dict[str, redis.Redis] = {}
        for url in urls:
            public = without_credentials(url)
            opts = dict(socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
            # as this central server's own Redis user, unless the URL names one
            self.clients[public] = (
                connect(url, **opts) if public != url else connect_like(url, control, **opts)
            )
        self.dirty: set[str] = set(self.clients)
        """Servers whose session users may be missing (not seen yet, or a failed call)."""
        self.down: set[str] = set()

    def publish(self) -> None:
        """The list in the settings hash (new sessions are placed on these)."""
        self.control.hset(self.keys.settings, FIELD, " ".join(self.clients))

    def session_user(self, name: str, pw_hash: str, sid: str) -> None:
        """Create (or reset) the session's user on its media server, if it has one."""
        url = (self.control.hget(self.keys.session(sid), FIELD) or b"").decode()
        r = self.clients.get(url)
        if r is None:
            return
        if url in self.down:  # not now (a hung server would hold the login): when it is back
            self.dirty.add(url)
            return
        try:
            self.setuser(r, name, pw_hash, sid)
        except redis.RedisError as exc:  # the watch re-creates it when the server answers
            log.warning("media server %s: session user %s not created: %s", url, name, exc)
            self.dirty.add(url)

    def drop(self, name: str) -> None:
        """Delete a user everywhere (best effort: a server that is down loses it on restart, or
        the next full pass of that server's users drops it)."""
        for url, r in self.clients.items():
            if url in self.down:
                self.dirty.add(url)  # its stale users go when it is back (_recreate)
                continue
            try:
                r.execute_command("ACL", "DELUSER", name)
                r.execute_command("CLIENT", "KILL", "USER", name)
            except redis.ResponseError:
                pass  # no such user or no connections: fine
            except redis.RedisError as exc:
                log.debug("media server %s: could not drop %s: %s", url, name, exc)

    def check(self) -> None:
        """One look at every server (see the module docstring)."""
        for url, r in self.clients.items():
            try:
                fresh = bool(r.set(self.keys.media_mark, "1", nx=True))
                if fresh or url in self.dirty:
                    n = self._recreate(url, r)
                    if n:
                        log.warning("media server %s: re-created %d session users", url, n)
                self.dirty.discard(url)
                if url in self.down:
                    self.down.discard(url)
                    self.control.srem(self.keys.media_down, url)
                    log.warning("media server %s answers again", url)
            except redis.RedisError as exc:
                self.dirty.add(url)
                if url not in self.down:
                    self.down.add(url)
                    log.warning("media server %s is unreachable: %s", url, exc)
                    self.control.sadd(self.keys.media_down, url)

    def _recreate(self, url: str, r: redis.Redis) -> int:
        """Make ``url``'s session users those of the live sessions placed there (re-created from
        the ``acl`` hash; any other session user dropped); returns how many were created."""
        live = [s.decode() for s in self.control.smembers(self.keys.sessions)]
        pipe = self.control.pipeline(transaction=False)
        for sid in live:
            pipe.hmget(self.keys.session(sid), FIELD, "acl", "state")
        wanted, here = {}, set()
        for sid, (media, pw_hash, state) in zip(live, pipe.execute(), strict=True):
            if media and media.decode() == url and state != b"closed":
                here.add(sid)
                if pw_hash:
                    wanted[session_acl_user(sid)] = (pw_hash.decode(), sid)
        for raw in r.execute_command("ACL", "USERS"):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name.startswith(SESSION_ACL_PREFIX) and name not in wanted:
                r.execute_command("ACL", "DELUSER", name)  # its session ended while the server was away
        for name, (pw_hash, sid) in wanted.items():
            self.setuser(r, name, pw_hash, sid)
        # streams of sessions that closed while it was away (the close job could not release
        # them): by the control server's word for each (a session created meanwhile is not closed)
        stale, ended = 0, {}
        for key in r.scan_iter(match=self.keys.session("*") + ":*", count=1000):
            sid = key.decode()[len(self.keys.session("")) - 1 :].split("}", 1)[0]
            if sid in here:
                continue
            if sid not in ended:
                state = self.control.hget(self.keys.session(sid), "state")
                ended[sid] = state in (None, b"closed")
            if ended[sid] and r.ttl(key) == -1:
                r.pexpire(key, STALE_KEEP_MS)
                stale += 1
        if stale:
            log.warning("media server %s: %d streams of ended sessions expire", url, stale)
        return len(wanted)

    def watch(self, stop: threading.Event, every: float = CHECK_EVERY) -> None:
        """:meth:`check` every ``every`` s until ``stop`` (a thread's body; 0: once at start)."""
        self.control.delete(self.keys.media_down)
        while not stop.is_set():
            try:
                self.check()
            except redis.RedisError as exc:  # the control server itself: the sweeper deals with it
                log.debug("media watch: %s", exc)
            if not every or stop.wait(every):
                return

    def close(self) -> None:
        for r in self.clients.values():
            r.close()
