"""Is a session over, and why, in the user's words: the one answer every client gives.

The session hash says it (``state``, ``close_reason``, ``token``). The command-line client
(:mod:`cloudq.client.session`) reads those fields with redis-py, the web gateway
(:mod:`cloudq.client.web`) with ``redis.asyncio``; both hand what they read to
:func:`session_end`, and word its reason with :func:`close_message` (the gateway sends those
words to the page, which keeps no table of its own).
"""

from __future__ import annotations

from cloudq.media import LOST_FIELD
from cloudq.state import CloseReason, SessionState
from cloudq.tokens import same_token

Field = str | bytes | None
"""A field as a client read it: bytes from Redis, str, or None when it is missing."""

SESSION_FIELDS = ("state", "close_reason", "node", "warning", "token", LOST_FIELD)
"""The fields of the session's hash a client watches (its state, why it closed, its node, a
warning, whose login holds it, a lost media server); each heartbeat reads them back."""


def session_fields(raw: list[bytes | None]) -> dict[str, str]:
    """An ``HMGET`` reply of :data:`SESSION_FIELDS`, as text ('' for a missing field)."""
    return dict(zip(SESSION_FIELDS, ((v or b"").decode() for v in raw), strict=True))


REASONS: dict[str, str] = {
    CloseReason.GRACE: "the session was closed: the client was gone longer than the reconnect grace",
    CloseReason.IDLE: "the session was closed: no input for too long",
    CloseReason.MAX_SESSION: "the session was closed: it reached the maximum session length",
    CloseReason.LOGOUT: "the session was closed: logged out elsewhere",
    CloseReason.USER_DELETED: "the session was closed: the account was deleted",
    CloseReason.DISABLED: "the session was closed: the account was disabled by the operator",
    CloseReason.SERVER_RESTARTED: "the session was closed: the server restarted without it (your work was saved)",
    CloseReason.MOUNT_FAILED: "the session was closed: your data could not be loaded onto a node",
    CloseReason.APP_ERROR: "the session was closed: the program on the node failed (your data was saved if it could be)",
    CloseReason.APP_EXITED: "the session was closed: the program exited (your files were saved)",
    CloseReason.APP_CRASHED: "the session was closed: the program crashed (your files were saved)",
    CloseReason.INPUT_FLOOD: "the session was closed: the client sent more input than the limits allow",
    CloseReason.ADMIN: "the session was closed by the operator",
    CloseReason.TAKEN_OVER: "the session was taken over by another login of the same user",
    CloseReason.CLOSED: "the session was closed",
    CloseReason.QUEUE_DROPPED: "dropped from the queue: the server no longer holds this login's place "
    "(it was not kept in time, or the login ended); log in again",
}
"""Every :class:`~cloudq.state.CloseReason` in plain words."""


WARNINGS: dict[str, str] = {
    "max_session": "the session reaches its maximum length soon: save your work",
}
"""A live session's ``warning`` field in plain words (both clients show these)."""


def warning_message(warning: str) -> str:
    return WARNINGS.get(warning, warning)


def _text(v: Field) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


def session_end(state: Field, close_reason: Field, token: Field = None, mine: str = "") -> str | None:
    """None while the session lives for this client; once it is over, why (a close reason).

    Over: the hash is gone or ``closed``, or a ``close_reason`` is set (a closing session is over
    for its clients before the close job marks it ``closed``, and ``login.lua`` will not reconnect
    into it): the reason is the recorded one, or ``closed`` when none was. Given ``mine`` (the
    hash of this client's token), a live session that holds another token was ``taken_over``.
    """
    reason = _text(close_reason)
    if _text(state) in ("", SessionState.CLOSED) or reason:
        return reason or CloseReason.CLOSED.value
    held = _text(token)
    if mine and held and not same_token(held, mine):
        return CloseReason.TAKEN_OVER.value
    return None


def close_message(reason: str) -> str:
    """The words for a close reason, with its detail (``app_crashed: exit status 1``,
    ``admin: <the operator's reason>``) where it has one."""
    if reason in REASONS:
        return REASONS[reason]
    kind, colon, detail = reason.partition(":")
    detail = detail.strip()
    if colon and kind in REASONS:
        if not detail:
            return REASONS[kind]
        return f"{REASONS[kind]}: {detail}" if kind == CloseReason.ADMIN else f"{REASONS[kind]} ({detail})"
    return f"the session was closed ({reason or 'no reason given'})"
