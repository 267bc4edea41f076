"""The client's side of logging in and waiting in the queue, written once for both clients that do
it: the launcher (:mod:`cloudq.client.launcher`, sync) and the browser gateway
(:mod:`cloudq.client.web`, asyncio, relaying for a page). Each does its own Redis I/O; what it
sends, how it waits for the reply and what the replies and queue polls mean are decided here.

A login, resume or logout is a :class:`~cloudq.messages.Request` ``RPUSH``\\ ed onto the requests
list (:func:`post`; :mod:`cloudq.central.intake` takes it from there) with a fresh unguessable id (:func:`~cloudq.credentials.new_request_id`), then
``BLPOP`` on its reply key in short blocks (:func:`reply_blocks`), below any socket timeout.

A queued client, every :attr:`QueueWait.interval`: ``SET`` its ``queued:<user>`` beat (PX
:attr:`QueueWait.beat_ms`), ``LPOS`` the queue (:meth:`QueueWait.moved`: a new position to show),
then ``BLPOP`` its ``notify:<token hash>`` for ``interval`` s (:meth:`QueueWait.after_wait`). In
that order: the central server takes a user off the queue and pushes the notification in one
script, so out of the queue at the ``LPOS`` and no notification after it means the client left the
queue without a node for it. Then :meth:`QueueWait.left` decides, from what the ticket resolves to
if the client may look it up (the gateway may; a queue user may not). The client never deletes its
beat (a queue user may only set it, :mod:`cloudq.central.acl`): it lapses by itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cloudq.credentials import new_request_id
from cloudq.keys import Keys
from cloudq.messages import Reply, Request
from cloudq.settings import Settings
from cloudq.state import CloseReason

REPLY_BLOCK = 1.0
"""The longest single ``BLPOP`` for a reply (s): below any client socket timeout."""
REFUSALS = frozenset({"invalid", "locked", "disabled"})
NO_ANSWER = "no central server answered in time"

# what a queue poll means (QueueStep.kind)
WAIT = "wait"  # still queued: poll again
ASSIGNED = "assigned"  # a node: the session is QueueStep.sid
LEFT = "left"  # out of the queue, no notification: ask QueueWait.left what that means
DROPPED = "dropped"  # the wait is over without a node, for QueueStep.reason

DROPPED_REASON = CloseReason.QUEUE_DROPPED.value
"""Why a client that lost its place stops (:func:`cloudq.sessionend.close_message` words it)."""


def login_request(user: str, password: str) -> Request:
    return Request("login", new_request_id(), user=user, password=password)


def logout_request(token: str) -> Request:
    return Request("logout", new_request_id(), token=token)


def resume_request(token: str, sid: str) -> Request:
    """Back into session ``sid`` with the token it was issued (after an outage): never a new
    session, never the queue; a ``closed`` reply carries why the session ended."""
    return Request("resume", new_request_id(), token=token, sid=sid)


def post(keys: Keys, req: Request) -> tuple[str, bytes]:
    """The ``RPUSH`` arguments that post ``req``: ``r.rpush(*post(keys, req))``."""
    return keys.requests, req.pack()


def reply_blocks(timeout: float) -> Iterator[float]:
    """The ``BLPOP`` timeouts of one wait for a reply: short blocks until ``timeout`` s have passed
    (stop at the first reply; if the iterator ends first, no central server answered)."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        yield min(REPLY_BLOCK, max(0.01, left))


def refusal(reply: Reply) -> str | None:
    """Why the server refused a login (``invalid``, ``locked``, ``disabled``, else ``error``);
    None when it did not."""
    if reply.ok:
        return None
    return reply.status if reply.status in REFUSALS else "error"


@dataclass(frozen=True)
class QueueStep:
    kind: str  # WAIT | ASSIGNED | LEFT | DROPPED
    sid: str = ""
    reason: str = ""


class QueueWait:
    """One queued client's wait: its clocks (from the published settings) and what each poll means.

    ``position`` is the place the client last showed (0: none yet); ``wait`` how long it waits at
    most (None: for ever). A client that rides out Redis errors uses :meth:`unreachable` to know
    when to stop: the central server does not count time it could not see against the beat, so
    a client gives it the reconnect grace plus one beat."""

    def __init__(self, settings: Settings, position: int = 0, wait: float | None = None) -> None:
        self.interval = settings.heartbeat_interval or 1.0
        self.ttl = settings.heartbeat_ttl or 3 * self.interval
        self.beat_ms = int(self.ttl * 1000)
        self.position = position
        self.deadline = None if wait is None else time.monotonic() + wait
        self.budget = (settings.grace or 120.0) + self.ttl
        self._lost_at: float | None = None

    def waiting(self) -> bool:
        """Whether the client still waits (its ``wait`` has not run out)."""
        return self.deadline is None or time.monotonic() < self.deadline

    def moved(self, pos: int | None) -> bool:
        """``LPOS`` said ``pos`` (0-based; None: not in the queue): True when :attr:`position`
        changed and the client should show it."""
        if pos is None or pos + 1 == self.position:
            return False
        self.position = pos + 1
        return True

    def after_wait(self, pos: int | None, popped: Sequence[bytes] | None) -> QueueStep:
        """The poll's ``LPOS`` answer and the ``BLPOP`` reply after it (``(key, session id)``, or
        None). A poll that answered: the Redis error budget of :meth:`unreachable` starts again."""
        self._lost_at = None
        if popped is not None:
            return QueueStep(ASSIGNED, sid=popped[1].decode())
        return QueueStep(LEFT) if pos is None else QueueStep(WAIT)

    @staticmethod
    def left(status: str | None = None, sid: str = "", reason: str = "") -> QueueStep:
        """What leaving the queue without a notification means, from what the client's token
        resolves to if it may look it up: ``session`` (a live session holds the token: another
        client of the same token took the notification) gives that session; ``queued`` (still
        this token's place: a race) waits on; ``revoked`` (token gone: logged out, or another
        login took the place) ends with ``logout``; ``gone`` ends with ``reason``; None (the client
        may not look: a queue user) ends with :data:`DROPPED_REASON`, as does a ``gone`` ticket
        with nothing more specific than ``closed``."""
        if status == "session" and sid:
            return QueueStep(ASSIGNED, sid=sid)
        if status == "queued":
            return QueueStep(WAIT)
        if status == "revoked":
            return QueueStep(DROPPED, reason=CloseReason.LOGOUT.value)
        if status == "gone" and reason not in ("", CloseReason.CLOSED):
            return QueueStep(DROPPED, reason=reason)
        return QueueStep(DROPPED, reason=DROPPED_REASON)

    def unreachable(self) -> bool:
        """A poll failed on a Redis error: True once Redis has not answered for the whole budget."""
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
        return now - self._lost_at >= self.budget
