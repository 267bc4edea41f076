"""``cloudq connect --upload FILE`` / ``--download PATH``: file transfers into and out of the
session's HOME over the session's own Redis connection (the messages are :mod:`cloudq.transfer`'s;
the browser gateway does the same in asyncio, :mod:`cloudq.client.web.files`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import redis

from cloudq import transfer as tx
from cloudq.keys import Keys

__all__ = ["TransferError", "download", "upload"]


class TransferError(RuntimeError):
    """The node refused the transfer or did not answer (the text says why)."""


class _Replies:
    def __init__(self, r: redis.Redis, key: str, tid: str) -> None:
        self.r, self.key, self.tid = r, key, tid
        newest = r.xrevrange(key, count=1)
        self.last: bytes = newest[0][0] if newest else b"0-0"
        self.queue: list[dict[str, Any]] = []

    def next(self) -> dict[str, Any]:
        end = time.monotonic() + tx.IDLE_TIMEOUT
        while not self.queue:
            if time.monotonic() > end:
                raise TransferError("the session's node did not answer")
            for _, entries in self.r.xread({self.key: self.last}, count=64, block=1000) or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    try:
                        msg = tx.unpack(fields, tx.NODE_OPS)
                    except tx.BadTransfer:
                        continue
                    if msg["id"] == self.tid:
                        self.queue.append(msg)
        msg = self.queue.pop(0)
        if msg["op"] == "error":
            raise TransferError(str(msg.get("error")))
        return msg


def _send(r: redis.Redis, keys: Keys, sid: str, **body: Any) -> None:
    r.xadd(keys.files(sid), tx.pack(**body), maxlen=tx.STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]


def upload(r: redis.Redis, keys: Keys, sid: str, local: str) -> str:
    """Upload the file ``local`` into ``~/Uploads``; returns its path in HOME."""
    name = tx.check_name(Path(local).name)
    tid = tx.new_id()
    replies = _Replies(r, keys.fileout(sid), tid)
    with open(local, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        _send(r, keys, sid, id=tid, op="put", name=name, size=size)
        acked, seq, sent = replies.next()["seq"], 0, 0
        while True:
            while acked < seq - tx.WINDOW:
                acked = max(acked, int(replies.next()["seq"]))
            chunk = fh.read(min(tx.CHUNK, size - sent))
            sent += len(chunk)
            last = sent >= size or not chunk
            _send(r, keys, sid, id=tid, op="data", seq=seq, data=chunk, last=last)
            seq += 1
            if last:
                break
    while True:
        msg = replies.next()
        if msg["op"] == "done":
            return str(msg["path"])


def download(r: redis.Redis, keys: Keys, sid: str, remote: str, local: str | None = None) -> tuple[str, int]:
    """Download ``remote`` (a path in HOME) into ``local`` (default: its name, here); returns
    ``(local path, bytes)``."""
    path = "/".join(tx.check_path(remote))
    tid = tx.new_id()
    replies = _Replies(r, keys.fileout(sid), tid)
    _send(r, keys, sid, id=tid, op="get", path=path)
    meta = replies.next()
    target = local or str(meta.get("name") or Path(path).name)
    got = 0
    with open(target + ".part", "wb") as fh:
        while True:
            msg = replies.next()
            data = msg.get("data") or b""
            fh.write(data)
            got += len(data)
            _send(r, keys, sid, id=tid, op="ack", seq=msg["seq"])
            if msg.get("last"):
                break
    if got != meta.get("size"):
        os.unlink(target + ".part")
        raise TransferError(f"{remote}: got {got} of {meta.get('size')} bytes")
    os.replace(target + ".part", target)
    return target, got
