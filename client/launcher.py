"""The cloud client's launcher: logs in through the central server, waits in the queue,
starts and stops the kernel, marks user activity, logs out.

Two Redis identities (see :mod:`cloudq.central.acl`): the connection it is given (the login user, or
no credentials) only posts requests and reads their replies; everything else goes through
:attr:`Launcher.sr`, which authenticates as the Redis user the login reply names (the queue
user while waiting, then the session user) with a password derived from the bearer token. A
new login (online reconnection) changes that password: :attr:`sr` follows.

Errors a user can meet are :class:`ClientError` with a one-line message and a distinct
exit code (see ``EXIT_CODES``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from cloudq import credentials
from cloudq.keys import Keys
from cloudq.messages import BadMessage, Reply, Request, unpack_reply
from cloudq.retry import Backoff
from cloudq.settings import Settings
from cloudq.tokens import session_acl_password, session_acl_user

log = logging.getLogger(__name__)

EXIT_CODES = {
    "error": 1,
    "usage": 2,
    "invalid": 3,
    "locked": 4,
    "disabled": 4,
    "unreachable": 5,
    "closed": 6,
    "stream": 7,
}


class ClientError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = EXIT_CODES.get(kind, 1)


@dataclass
class Ticket:
    """What a successful login gives the client."""

    user: str
    token: str
    sid: str
    node: str
    status: str
    acl_user: str = ""


AUTH_WAIT = 5.0  # the central server creates a queued client's session user just after the notification


class Launcher:
    def __init__(self, r: redis.Redis, keys: Keys, reply_timeout: float = 10.0) -> None:
        self.r = r
        self.keys = keys
        self.reply_timeout = reply_timeout
        self.settings = Settings()
        self.creds = credentials.Credentials()
        self._sr: redis.Redis | None = None
        self.trusted = False  # the server gave no Redis user: ACLs are off

    @property
    def sr(self) -> redis.Redis:
        """The connection for everything but login/logout: the session's own Redis user."""
        return self._sr if self._sr is not None else self.r

    def use_identity(self, acl_user: str, token: str) -> None:
        """Authenticate :attr:`sr` as ``acl_user`` from now on (``""``: ACLs off, use the login
        connection). Idle connections made with older credentials are closed."""
        if not acl_user:
            if not self.trusted:
                log.warning(
                    "the server created no Redis user for this session: %s", credentials.TRUSTED_WARNING
                )
            self.trusted, self._sr = True, None
            return
        self.creds.set(acl_user, session_acl_password(token))
        if self._sr is None:
            self._sr = credentials.as_user(self.r, self.creds)
        else:
            # idle connections only: a busy one belongs to another thread (closing it under that
            # thread breaks its read); the server cuts those itself (CLIENT KILL USER) when the
            # old credentials stop being valid, and they reconnect with the new ones
            self._sr.connection_pool.disconnect(inuse_connections=False)
        try:
            credentials.wait_authenticated(self._sr, AUTH_WAIT)
        except redis.AuthenticationError:
            raise ClientError("error", "the server did not accept this session's credentials") from None

    def _request(self, req: Request) -> Reply:
        try:
            self.r.xadd(self.keys.requests, req.pack(), maxlen=10000, approximate=True)
            got = None
            end = time.monotonic() + self.reply_timeout
            while got is None and time.monotonic() < end:  # short blocks: below any socket timeout
                got = self.r.blpop(
                    [self.keys.reply(req.id)], timeout=min(1.0, max(0.01, end - time.monotonic()))
                )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ClientError("unreachable", f"cannot reach the server: {exc}") from None
        if got is None:
            raise ClientError("unreachable", "no central server answered in time")
        try:
            return unpack_reply(got[1])
        except BadMessage as exc:
            raise ClientError("error", f"unreadable reply from the server: {exc}") from None

    def login(
        self,
        user: str,
        password: str,
        wait: float | None = None,
        on_position: Callable[[int], None] | None = None,
        queue: bool = True,
    ) -> Ticket:
        """Log in; if queued, wait (up to ``wait`` s, None = forever) for a node.

        With ``queue=False`` (a client logging in again to its session) a queued reply is not
        waited on: the ticket comes back with status ``queued`` and the caller decides.
        """
        reply = self._request(Request("login", credentials.new_request_id(), user=user, password=password))
        if not reply.ok:
            raise ClientError(reply.status if reply.status in EXIT_CODES else "error", reply.error)
        try:
            self.use_identity(reply.acl_user, reply.token)
            self.settings = Settings.load(self.sr, self.keys)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ClientError("unreachable", f"cannot reach the server: {exc}") from None
        if reply.status != "queued" or not queue:
            return Ticket(user, reply.token, reply.sid, reply.node, reply.status, reply.acl_user)
        return self._wait_in_queue(user, reply, wait, on_position)

    def _wait_in_queue(
        self, user: str, reply: Reply, wait: float | None, on_position: Callable[[int], None] | None
    ) -> Ticket:
        from cloudq.tokens import hash_token

        th = hash_token(reply.token)
        deadline = None if wait is None else time.monotonic() + wait
        interval = self.settings.heartbeat_interval or 1.0
        ttl = self.settings.heartbeat_ttl or 3 * interval
        position = reply.position
        if on_position:
            on_position(position)
        # a Redis blip (a pause, a restart, a failover) while queued is ridden out like one in a
        # session: the central server does not count time it could not see against the beat
        budget = (self.settings.grace or 120.0) + ttl
        backoff = Backoff(0.1, 2.0)
        lost_at: float | None = None
        while deadline is None or time.monotonic() < deadline:
            try:
                self.sr.set(self.keys.queued(user), "1", px=int(ttl * 1000))
                got = self.sr.blpop([self.keys.notify(th)], timeout=interval)
                if got is not None:
                    sid = got[1].decode()
                    # the queued user's `queued` beat lapses by itself (it may not DEL)
                    acl_user = session_acl_user(sid) if reply.acl_user else ""
                    self.use_identity(acl_user, reply.token)
                    node = (self.sr.hget(self.keys.session(sid), "node") or b"").decode()
                    return Ticket(user, reply.token, sid, node, "assigned", acl_user)
                pos = self.sr.lpos(self.keys.queue, user)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                lost_at = lost_at or time.monotonic()
                if time.monotonic() - lost_at >= budget:
                    raise ClientError("unreachable", f"lost the server while queued: {exc}") from None
                log.info("queued: the server did not answer (%s); again in <%.1f s", exc, backoff.peek())
                time.sleep(backoff.next())
                continue
            lost_at = None
            backoff.reset()
            if pos is not None and pos + 1 != position:
                position = pos + 1
                if on_position:
                    on_position(position)
        self.logout(reply.token)
        raise ClientError("error", "gave up waiting for a free node")

    def logout(self, token: str) -> None:
        try:
            self._request(Request("logout", credentials.new_request_id(), token=token))
        except ClientError as exc:
            log.warning("logout failed: %s", exc)

    def mark_activity(self, sid: str) -> None:
        """The user gave input: refresh the session's activity key."""
        if self.settings.idle_timeout:
            self.sr.set(self.keys.activity(sid), "1", px=int(self.settings.idle_timeout * 1000))
