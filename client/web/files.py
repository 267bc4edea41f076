"""The gateway's file transfers: HTTP in front, the session's ``files``/``fileout`` streams behind
(the messages are :mod:`cloudq.transfer`'s; the node writes and reads HOME, the gateway holds no
file). Authorised by the token cookie like ``/ws``; every Redis call goes through the session's
own Redis user (:func:`~cloudq.client.web.socket.open_session_redis`).

``POST /files/upload?name=NAME``  body: the file (``Content-Type: application/octet-stream``, which
    no cross-site form can send; a cross-site ``Origin`` is refused too), ``Content-Length``
    required and at most the published ``file_limit`` (413). 200 ``{"path": "Uploads/NAME",
    "size"}``; 400 ``{"error"}`` for a refused name or a node's refusal.
``GET /files/download?path=PATH``  the file under HOME as an attachment (404/400 ``{"error"}``).
``GET /files/list?path=DIR``  200 ``{"entries": [[name, size], ...]}`` (``DIR`` default
    ``Downloads``).

Flow control: at most :data:`~cloudq.transfer.WINDOW` chunks of a transfer are in Redis at a time
(upload: the gateway waits for the node's acks; download: the node waits for the gateway's), so a
slow browser or node holds 2 MiB of Redis memory per transfer, not the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import AuthenticationError, RedisError

from cloudq import transfer as tx
from cloudq.client.web.socket import media_redis, open_session_redis

if TYPE_CHECKING:
    from cloudq.client.web.http import Gateway

__all__ = ["add_routes"]


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


class _Replies:
    """The node's replies to one transfer, read from the ``fileout`` stream after ``start``."""

    def __init__(self, sr: aioredis.Redis, key: str, tid: str) -> None:
        self.sr, self.key, self.tid = sr, key, tid
        self.last: bytes | str = "0-0"
        self.queue: list[dict[str, Any]] = []

    async def start(self) -> None:
        newest = await self.sr.xrevrange(self.key, count=1)
        self.last = newest[0][0] if newest else b"0-0"

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(tx.IDLE_TIMEOUT):
            while not self.queue:
                resp = await self.sr.xread({self.key: self.last}, count=64, block=1000)
                for _, entries in resp or []:
                    for entry_id, fields in entries:
                        self.last = entry_id
                        with contextlib.suppress(tx.BadTransfer):
                            msg = tx.unpack(fields, tx.NODE_OPS)
                            if msg["id"] == self.tid:
                                self.queue.append(msg)
        return self.queue.pop(0)


class Files:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def _session(self, request: web.Request) -> tuple[aioredis.Redis, str] | web.Response:
        from cloudq.client.web.http import COOKIE

        token = request.cookies.get(COOKIE, "")
        try:
            who = await self.gw.resolve(token, self.gw.hints(request))
            if who is None or who.status != "session":
                return _error(401, "not logged in to a session")
            sr, _ = await open_session_redis(
                self.gw.cfg.redis_url, who.sid, token, self.gw.cfg.session_rights
            )
            mr = await media_redis(sr, self.gw.keys, who.sid)  # the file streams' server
            if mr is not sr:
                await sr.aclose()
                sr = mr
        except AuthenticationError:
            return _error(401, "not logged in to a session")
        except RedisError:
            return _error(503, "the service is not answering; try again in a moment")
        return sr, who.sid

    async def _open(self, request: web.Request) -> tuple[aioredis.Redis, str, str, _Replies] | web.Response:
        """One transfer's start: the session's connection (as its user, on its media server), the
        session id, a new transfer id and the reader of its replies (reading from now on)."""
        got = await self._session(request)
        if isinstance(got, web.Response):
            return got
        sr, sid = got
        tid = tx.new_id()
        replies = _Replies(sr, self.gw.keys.fileout(sid), tid)
        try:
            await replies.start()
        except RedisError:
            await sr.aclose()
            return _error(503, "the service is not answering; try again in a moment")
        return sr, sid, tid, replies

    async def _send(self, sr: aioredis.Redis, sid: str, **body: Any) -> None:
        await sr.xadd(self.gw.keys.files(sid), tx.pack(**body), maxlen=tx.STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]

    async def upload(self, request: web.Request) -> web.StreamResponse:
        gw = self.gw
        if gw.cross_site(request) or request.content_type != "application/octet-stream":
            gw.counters["upload_cross_site"] += 1
            return _error(403, "uploads need Content-Type: application/octet-stream from this site")
        try:
            name = tx.check_name(request.query.get("name", ""))
        except tx.BadTransfer as e:
            return _error(400, str(e))
        size, limit = request.content_length, (await gw.settings()).file_limit
        if not limit:
            return _error(403, "file transfers are off on this service")
        if size is None:
            return _error(411, "Content-Length required")
        if size > limit:
            return _error(413, f"the file is larger than the service's limit of {limit} bytes")
        got = await self._open(request)
        if isinstance(got, web.Response):
            return got
        sr, sid, tid, replies = got
        try:
            await self._send(sr, sid, id=tid, op="put", name=name, size=size)
            acked, seq, sent = -2, 0, 0
            while True:
                while acked < seq - tx.WINDOW or acked == -2:
                    m = await replies.next()
                    if m["op"] == "error":
                        return _error(400, str(m.get("error")))
                    acked = max(acked, int(m.get("seq", -1)))
                chunk = await request.content.readexactly(min(tx.CHUNK, size - sent))
                sent += len(chunk)
                await self._send(sr, sid, id=tid, op="data", seq=seq, data=chunk, last=sent >= size)
                seq += 1
                if sent >= size:
                    break
            while True:
                m = await replies.next()
                if m["op"] == "done":
                    gw.counters["uploads"] += 1
                    return web.json_response({"path": m.get("path"), "size": m.get("size")})
                if m["op"] == "error":
                    return _error(400, str(m.get("error")))
        except asyncio.IncompleteReadError:
            with contextlib.suppress(RedisError):
                await self._send(sr, sid, id=tid, op="abort")
            return _error(400, "the upload ended early")
        except TimeoutError:
            return _error(504, "the session's node did not answer")
        except RedisError:
            return _error(503, "the service is not answering; try again in a moment")
        finally:
            await sr.aclose()

    async def download(self, request: web.Request) -> web.StreamResponse:
        try:
            path = "/".join(tx.check_path(request.query.get("path", "")))
        except tx.BadTransfer as e:
            return _error(400, str(e))
        got = await self._open(request)
        if isinstance(got, web.Response):
            return got
        sr, sid, tid, replies = got
        resp: web.StreamResponse | None = None
        try:
            await self._send(sr, sid, id=tid, op="get", path=path)
            m = await replies.next()
            if m["op"] != "meta":
                return _error(404 if "no such" in str(m.get("error")) else 400, str(m.get("error")))
            quoted = urllib.parse.quote(str(m.get("name", "download")))
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Disposition": f"attachment; filename*=UTF-8''{quoted}",
                    "Content-Length": str(int(m["size"])),
                }
            )
            await resp.prepare(request)
            while True:
                m = await replies.next()
                if m["op"] != "data":
                    break  # an error mid-way: the client sees a short body
                await resp.write(m.get("data") or b"")
                await self._send(sr, sid, id=tid, op="ack", seq=m["seq"])
                if m.get("last"):
                    self.gw.counters["downloads"] += 1
                    break
            await resp.write_eof()
            return resp
        except (TimeoutError, RedisError):
            if resp is not None:
                return resp
            return _error(504, "the session's node did not answer")
        finally:
            await sr.aclose()

    async def listing(self, request: web.Request) -> web.StreamResponse:
        try:
            path = "/".join(tx.check_path(request.query.get("path", "Downloads")))
        except tx.BadTransfer as e:
            return _error(400, str(e))
        got = await self._open(request)
        if isinstance(got, web.Response):
            return got
        sr, sid, tid, replies = got
        try:
            await self._send(sr, sid, id=tid, op="list", path=path)
            m = await replies.next()
            if m["op"] != "listing":
                return _error(404 if "no such" in str(m.get("error")) else 400, str(m.get("error")))
            return web.json_response({"path": path, "entries": m.get("entries", [])})
        except (TimeoutError, RedisError):
            return _error(504, "the session's node did not answer")
        finally:
            await sr.aclose()


def add_routes(app: web.Application, gw: Gateway) -> None:
    f = Files(gw)
    app.router.add_post("/files/upload", f.upload)
    app.router.add_get("/files/download", f.download)
    app.router.add_get("/files/list", f.listing)
