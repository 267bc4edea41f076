"""Control-plane messages that cross Redis: one dataclass each, one pack, one unpack.

Every reader calls the ``unpack_*`` function, which raises :class:`BadMessage` (with a
reason) for anything that is not what it should be; readers log, count and drop it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

MAX_REQUEST_BYTES = 4096
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
SESSION_ID = re.compile(r"^s[0-9]{1,18}$")
"""What ``create_session`` (``_lib.lua``) names a session: ``s`` and a sequence number."""


class BadMessage(ValueError):
    """A message that cannot be used; ``str()`` says why."""


def _load(raw: bytes | None, limit: int) -> dict[str, Any]:
    if raw is None:
        raise BadMessage("missing payload field")
    if len(raw) > limit:
        raise BadMessage(f"payload of {len(raw)} bytes exceeds {limit}")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadMessage(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise BadMessage("payload is not a map")
    return obj


def _str(obj: dict[str, Any], name: str, required: bool = True, limit: int = 1024) -> str:
    v = obj.get(name)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise BadMessage(f"field {name!r} missing or not a string")
    if len(v) > limit:
        raise BadMessage(f"field {name!r} too long")
    return v


@dataclass
class Request:
    """A client's request to the central servers (``requests`` stream, field ``m``)."""

    op: str  # "login" | "logout" | "resume"
    id: str
    user: str = ""
    password: str = ""
    token: str = ""
    sid: str = ""  # resume: the session the token was issued for

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self))


def unpack_request(raw: bytes | None) -> Request:
    """A request as a client pushed it (:meth:`Request.pack`); :class:`BadMessage` if it is not one."""
    obj = _load(raw, MAX_REQUEST_BYTES)
    op = _str(obj, "op", limit=16)
    rid = _str(obj, "id", limit=64)
    if not REQUEST_ID.match(rid):
        raise BadMessage("bad request id")
    if op == "login":
        user = _str(obj, "user", limit=64)
        if not USER_NAME.match(user):
            raise BadMessage("bad user name")
        return Request(op, rid, user=user, password=_str(obj, "password", limit=1024))
    if op == "logout":
        return Request(op, rid, token=_str(obj, "token", limit=128))
    if op == "resume":
        sid = _str(obj, "sid", limit=64)
        if not SESSION_ID.match(sid):
            raise BadMessage("bad session id")
        return Request(op, rid, token=_str(obj, "token", limit=128), sid=sid)
    raise BadMessage(f"unknown op {op!r}")


@dataclass
class Reply:
    """The central server's answer, pushed to ``reply:<request id>``."""

    ok: bool
    status: str = ""  # assigned | reconnect | queued | moving | logged_out | error code
    error: str = ""
    token: str = ""
    sid: str = ""
    node: str = ""
    position: int = 0
    acl_user: str = ""  # the Redis user to reconnect as (password: session_acl_password(token))
    reason: str = ""  # status "closed" (a resume): why the session ended (a CloseReason)

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self))


def unpack_reply(raw: bytes) -> Reply:
    obj = _load(raw, 64 * 1024)
    try:
        return Reply(
            ok=bool(obj["ok"]),
            status=str(obj.get("status", "")),
            error=str(obj.get("error", "")),
            token=str(obj.get("token", "")),
            sid=str(obj.get("sid", "")),
            node=str(obj.get("node", "")),
            position=int(obj.get("position", 0)),
            acl_user=str(obj.get("acl_user", "")),
            reason=str(obj.get("reason", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadMessage(f"bad reply: {exc}") from None


@dataclass
class Control:
    """A command on a node's control stream."""

    cmd: str  # start | sleep | wake | stop | flush | keyframe
    sid: str = ""
    gen: int = 0
    ref: str = ""  # flush: the id the node acknowledges with (node hash field ``flushed``)


CONTROL_COMMANDS = {"start", "sleep", "wake", "stop", "flush", "keyframe"}


def pack_control(c: Control) -> dict[str, str]:
    return {"cmd": c.cmd, "sid": c.sid, "gen": str(c.gen), "ref": c.ref}


def unpack_control(fields: dict[bytes, bytes]) -> Control:
    try:
        cmd = fields[b"cmd"].decode()
        sid = fields.get(b"sid", b"").decode()
        gen = int(fields.get(b"gen", b"0"))
        ref = fields.get(b"ref", b"").decode()
    except (KeyError, UnicodeDecodeError, ValueError) as exc:
        raise BadMessage(f"bad control message: {type(exc).__name__}") from None
    if cmd not in CONTROL_COMMANDS:
        raise BadMessage(f"unknown control command {cmd!r}")
    if len(sid) > 64 or len(ref) > 64:
        raise BadMessage("sid or ref too long")
    return Control(cmd, sid, gen, ref)
