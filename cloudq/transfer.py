"""File transfer between a client and its session's HOME, through Redis: the messages and the rules
both sides agree on (no I/O here). The node side is :mod:`cloudq.workers.files`; the browser
gateway's is :mod:`cloudq.client.web.files`; ``cloudq connect --upload/--download`` uses
:mod:`cloudq.client.transfer`.

The gateway may run on another host than the node, so bytes go through two streams of the
session: ``session:{sid}:files`` (client -> node; the session's Redis user may only ``XADD``) and
``session:{sid}:fileout`` (node -> client; read-only for it). Each message is one msgpack map in
field ``m`` with the transfer's ``id`` (random, the client's) and an ``op``:

client -> node
    ``put`` ``name``, ``size``: an upload into ``~/Uploads/<name>`` begins; then ``data`` ``seq``
    (0, 1, ...), ``data`` (at most :data:`CHUNK` bytes), ``last``; the node acks each chunk.
    ``get`` ``path`` (relative to HOME): a download; the node answers ``meta`` then sends ``data``
    chunks, at most :data:`WINDOW` ahead of the client's ``ack`` ``seq``.
    ``list`` ``path`` (a directory relative to HOME, e.g. ``Downloads``); ``abort``.
node -> client
    ``ack`` ``seq`` (-1 for a ``put`` accepted), ``done`` ``path``, ``size`` (an upload is in
    place), ``meta`` ``size``, ``name``; ``data`` ``seq``, ``data``, ``last``; ``listing``
    ``entries`` (``[name, size]`` of the directory's regular files); ``error`` ``error``.

Paths: relative to HOME, ``/``-separated, no empty, ``.`` or ``..`` component, no NUL, no
backslash; an upload's name is one component. The node also refuses symlinks anywhere on the way
and files that are not regular (:mod:`cloudq.workers.files`). Sizes are capped by the published
``file_limit`` (:class:`cloudq.settings.Settings`; 0 = no transfers).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import msgpack

__all__ = [
    "CHUNK",
    "IDLE_TIMEOUT",
    "MAX_PATH",
    "STREAM_MAXLEN",
    "UPLOADS",
    "WINDOW",
    "BadTransfer",
    "check_name",
    "check_path",
    "new_id",
    "pack",
    "unpack",
]

CHUNK = 256 * 1024
WINDOW = 8
"""Chunks in flight per transfer (2 MiB): what a slow reader leaves in Redis at most."""
STREAM_MAXLEN = 4 * WINDOW + 64
IDLE_TIMEOUT = 60.0
"""Seconds without a message after which either side drops a transfer."""
MAX_PATH = 1024
MAX_MESSAGE = CHUNK + 4096
UPLOADS = "Uploads"
CLIENT_OPS = frozenset({"put", "data", "get", "ack", "list", "abort"})
NODE_OPS = frozenset({"ack", "done", "meta", "data", "listing", "error"})


class BadTransfer(ValueError):
    """A transfer message or path that cannot be used; the text says why (sent to the client)."""


def new_id() -> str:
    return secrets.token_hex(8)


def pack(**body: Any) -> dict[str, bytes]:
    return {"m": msgpack.packb(body, use_bin_type=True)}


def unpack(fields: Mapping[Any, Any], ops: frozenset[str] = CLIENT_OPS) -> dict[str, Any]:
    """XADD fields -> the message (``id`` and ``op`` checked; the rest is each op's business)."""
    raw = fields.get(b"m", fields.get("m"))
    if not isinstance(raw, bytes) or len(raw) > MAX_MESSAGE:
        raise BadTransfer("not a transfer message")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception:
        raise BadTransfer("not msgpack") from None
    if not isinstance(body, dict) or body.get("op") not in ops:
        raise BadTransfer("unknown operation")
    tid = body.get("id")
    if not isinstance(tid, str) or not 0 < len(tid) <= 64:
        raise BadTransfer("bad transfer id")
    return body


def check_path(path: Any) -> list[str]:
    """A path relative to HOME -> its components; :class:`BadTransfer` for anything else."""
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH:
        raise BadTransfer("a path must be a non-empty string")
    if path.startswith("/") or path.startswith("~"):
        raise BadTransfer("absolute paths are refused: name a path inside HOME")
    if "\x00" in path or "\\" in path:
        raise BadTransfer("bad character in path")
    parts = path.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise BadTransfer("'..', '.' and empty path components are refused")
        if len(p.encode()) > 255:
            raise BadTransfer("a path component is too long")
    return parts


def check_name(name: Any) -> str:
    """An upload's file name: one component of :func:`check_path`."""
    parts = check_path(name)
    if len(parts) != 1:
        raise BadTransfer("an upload's name is a file name, not a path")
    return parts[0]
