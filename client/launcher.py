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

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from cloudq import credentials, loginflow
from cloudq.keys import Keys
from cloudq.media import connect_like, session_media
from cloudq.messages import BadMessage, Reply, Request, unpack_reply
from cloudq.retry import Backoff
from cloudq.sessionend import close_message
from cloudq.settings import Settings
from cloudq.tokens import hash_token, session_acl_password, session_acl_user

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


class SessionOver(ClientError):
    """The session a client came back to is over: :attr:`reason` (a close reason) says why."""

    def __init__(self, reason: str) -> None:
        super().__init__("closed", close_message(reason))
        self.reason = reason


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
        self._media: tuple[str, redis.Redis] | None = None
        self._placed: tuple[str, str] | None = None  # (sid, its media URL): placed for its life
        self._activity_at = float("-inf")  # when the activity key was last refreshed
        self.trusted = False  # the server gave no Redis user: ACLs are off

    @property
    def sr(self) -> redis.Redis:
        """The connection for everything but login/logout: the session's own Redis user."""
        return self._sr if self._sr is not None else self.r

    def media(self, sid: str) -> redis.Redis:
        """The connection for session ``sid``'s streams (video, input, files): its media server
        (:mod:`cloudq.media`, named in the session hash) as the session's own user, or :attr:`sr`
        when the control server holds them. A session keeps its media server for life, so its
        URL is read once."""
        if self._placed is None or self._placed[0] != sid:
            self._placed = (sid, session_media(self.sr, self.keys, sid))
        url = self._placed[1]
        if not url:
            return self.sr
        if self._media is None or self._media[0] != url:
            self._media = (url, connect_like(url, self.sr))
        return self._media[1]

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
        """Post ``req`` and wait for the central server's reply (:mod:`cloudq.loginflow`)."""
        got = None
        try:
            self.r.rpush(*loginflow.post(self.keys, req))
            for block in loginflow.reply_blocks(self.reply_timeout):
                got = self.r.blpop([self.keys.reply(req.id)], timeout=block)
                if got is not None:
                    break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ClientError("unreachable", f"cannot reach the server: {exc}") from None
        if got is None:
            raise ClientError("unreachable", loginflow.NO_ANSWER)
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
        reply = self._request(loginflow.login_request(user, password))
        backoff, end = Backoff(0.2, 2.0), time.monotonic() + self.reply_timeout
        while reply.status == "busy" and time.monotonic() < end:
            # the central servers' password checks are all taken (a flood): ask again shortly
            time.sleep(backoff.next())
            reply = self._request(loginflow.login_request(user, password))
        refused = loginflow.refusal(reply)
        if refused:
            raise ClientError(refused, reply.error)
        try:
            self.use_identity(reply.acl_user, reply.token)
            self.settings = Settings.load(self.sr, self.keys)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ClientError("unreachable", f"cannot reach the server: {exc}") from None
        if reply.status != "queued" or not queue:
            return Ticket(user, reply.token, reply.sid, reply.node, reply.status, reply.acl_user)
        return self._wait_in_queue(user, reply, wait, on_position)

    def resume(self, ticket: Ticket) -> Ticket:
        """Back into ``ticket``'s session after an outage, with its token (no password, never a new
        session or the queue). Raises :class:`SessionOver` with the reason when the session ended
        meanwhile (``taken_over`` when another login holds it), ``ClientError("expired")`` when the
        token lapsed (log in again with the password)."""
        reply = self._request(loginflow.resume_request(ticket.token, ticket.sid))
        if reply.status == "closed":
            raise SessionOver(reply.reason or "closed")
        if not reply.ok:
            raise ClientError("expired" if reply.status == "expired" else "error", reply.error)
        try:
            self.use_identity(reply.acl_user, reply.token)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ClientError("unreachable", f"cannot reach the server: {exc}") from None
        return Ticket(ticket.user, reply.token, reply.sid, reply.node, reply.status, reply.acl_user)

    def _wait_in_queue(
        self, user: str, reply: Reply, wait: float | None, on_position: Callable[[int], None] | None
    ) -> Ticket:
        """Keep the place (what each poll means is :class:`loginflow.QueueWait`'s decision, the
        same as the gateway's) until a node is assigned, the place is lost, or ``wait`` runs out."""
        q = loginflow.QueueWait(self.settings, reply.position, wait)
        th = hash_token(reply.token)
        if on_position:
            on_position(q.position)
        backoff = Backoff(0.1, 2.0)
        while q.waiting():
            try:
                self.sr.set(self.keys.queued(user), "1", px=q.beat_ms)
                pos = self.sr.lpos(self.keys.queue, user)
                if q.moved(pos) and on_position:
                    on_position(q.position)
                step = q.after_wait(pos, self.sr.blpop([self.keys.notify(th)], timeout=q.interval))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if isinstance(exc, redis.AuthenticationError) and reply.acl_user:
                    # the server deleted this ticket's queue user (acl.py): its place is gone
                    step = q.left()
                else:
                    # a Redis blip (a pause, a restart, a failover) while queued is ridden out
                    # like one in a session, within the budget QueueWait gives
                    if q.unreachable():
                        raise ClientError("unreachable", f"lost the server while queued: {exc}") from None
                    log.info("queued: the server did not answer (%s); again in <%.1f s", exc, backoff.peek())
                    time.sleep(backoff.next())
                    continue
            backoff.reset()
            if step.kind == loginflow.LEFT:
                step = q.left()  # a queue user may not look its ticket up
            if step.kind == loginflow.ASSIGNED:
                acl_user = session_acl_user(step.sid) if reply.acl_user else ""
                node = ""
                # the notification is taken: a blip now is the session's to ride out (it reconnects)
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    self.use_identity(acl_user, reply.token)
                    node = (self.sr.hget(self.keys.session(step.sid), "node") or b"").decode()
                return Ticket(user, reply.token, step.sid, node, "assigned", acl_user)
            if step.kind == loginflow.DROPPED:
                log.warning("queued: left the queue without a node (%s)", step.reason)
                self.logout(reply.token)
                raise ClientError("closed", close_message(step.reason))
        self.logout(reply.token)
        raise ClientError("error", "gave up waiting for a free node")

    def logout(self, token: str) -> None:
        try:
            self._request(loginflow.logout_request(token))
        except ClientError as exc:
            log.warning("logout failed: %s", exc)

    def mark_activity(self, sid: str) -> None:
        """The user gave input: refresh the session's activity key (at most every
        :attr:`Settings.activity_refresh`, as the gateway does: one SET per mouse move doubled
        the server's commands while drawing)."""
        now = time.monotonic()
        if self.settings.idle_timeout and now - self._activity_at >= self.settings.activity_refresh:
            self.sr.set(self.keys.activity(sid), "1", px=int(self.settings.idle_timeout * 1000))
            self._activity_at = now
