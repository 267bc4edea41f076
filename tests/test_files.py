"""File transfer through real processes: a browser's HTTP requests to the gateway, the session's
``files``/``fileout`` streams, the node writing and reading the session's HOME (``cloudq.transfer``,
``workers/files.py``, ``client/web/files.py``)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import Procs, session_field, start_pool, wait_for
from test_gateway_browser import Gateway

from cloudq import transfer as tx
from cloudq.client.launcher import Launcher
from cloudq.client.transfer import TransferError, download, upload
from cloudq.keys import Keys
from cloudq.workers.data import workspace_dir

LIMIT = 1_000_000


class Browser:
    """A cookie jar and the gateway's URL: what a page's fetch does, without the page."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))

    def call(self, method: str, path: str, data: bytes | None = None, ctype: str = "") -> tuple[int, bytes]:
        req = urllib.request.Request(self.gw.url + path, data=data, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method: str, path: str, data: bytes | None = None, ctype: str = "") -> tuple[int, Any]:
        status, body = self.call(method, path, data, ctype)
        return status, json.loads(body)


def test_uploads_land_in_home_downloads_come_back_and_paths_out_of_home_are_refused(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    start_pool(r, keys, procs, nodes=1, users=("alice",), grace=30, idle_timeout=30, file_limit=LIMIT)
    gw = Gateway(procs).start()
    b = Browser(gw)
    status, who = b.json(
        "POST", "/login", json.dumps({"user": "alice", "password": "pw"}).encode(), "application/json"
    )
    assert status == 200, who
    wait_for(lambda: session_field(r, keys, who["sid"]) == "active", 20, what="the session active")
    home = workspace_dir(Path(procs.log_dir or "") / "workspace", "n1")

    # upload: three chunks, a non-ASCII name, into ~/Uploads
    data = os.urandom(2 * tx.CHUNK + 1000)
    status, got = b.json("POST", "/files/upload?name=r%C3%A9sum%C3%A9.bin", data, "application/octet-stream")
    assert (status, got) == (200, {"path": "Uploads/résumé.bin", "size": len(data)})
    assert (home / "Uploads" / "résumé.bin").read_bytes() == data
    assert not [p for p in (home / "Uploads").iterdir() if p.name.startswith(".")], "no part file left"

    # download and listing of ~/Downloads: the same bytes back
    (home / "Downloads").mkdir()
    (home / "Downloads" / "report.bin").write_bytes(data[::-1])
    assert b.call("GET", "/files/download?path=Downloads/report.bin") == (200, data[::-1])
    assert b.json("GET", "/files/list?path=Downloads") == (
        200,
        {"path": "Downloads", "entries": [["report.bin", len(data)]]},
    )

    # out of HOME: '..', absolute paths, a symlink (at the end or on the way) are refused
    (home / "Downloads" / "passwd").symlink_to("/etc/passwd")
    (home / "etc").symlink_to("/etc")
    for path in (
        "../n1/data/Downloads/report.bin",
        "Downloads/../../x",
        "/etc/passwd",
        "Downloads/passwd",
        "etc/passwd",
    ):
        status, body = b.call("GET", f"/files/download?path={path}")
        assert status in (400, 404) and b"root:" not in body, (path, status, body)
    for name in ("../evil", "a/b", "..", ""):
        status, _ = b.call("POST", f"/files/upload?name={name}", b"x", "application/octet-stream")
        assert status == 400, name
    assert not (home.parent / "evil").exists()
    # a form-like content type (no CORS preflight) and a file over the limit
    assert b.call("POST", "/files/upload?name=f.txt", b"x", "text/plain")[0] == 403
    assert b.call("POST", "/files/upload?name=big", b"x" * (LIMIT + 1), "application/octet-stream")[0] == 413
    assert sorted(p.name for p in (home / "Uploads").iterdir()) == ["résumé.bin"]


def test_the_python_client_uploads_and_downloads_as_the_sandboxed_programs_user(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    """``cloudq connect --upload/--download`` (client/transfer.py) over the session's own Redis user,
    into an ``x11:`` session's sandboxed HOME: the upload belongs to the program's uid."""
    start_pool(r, keys, procs, 1, "x11:xclock", ("--size", "320x240"), users=("alice",), idle_timeout=30)
    launcher = Launcher(r, keys)
    t = launcher.login("alice", "pw")
    wait_for(lambda: session_field(r, keys, t.sid) == "active", 20, what="the session active")
    home = workspace_dir(Path(procs.log_dir or "") / "workspace", "n1")
    local = tmp_path / "notes.txt"
    local.write_bytes(b"hello from the client\n" * 30000)
    assert upload(launcher.sr, keys, t.sid, str(local)) == "Uploads/notes.txt"
    st, owner = (home / "Uploads" / "notes.txt").stat(), home.stat()
    assert (st.st_uid, st.st_gid) == (owner.st_uid, owner.st_gid)  # the program's, not the node's
    assert owner.st_uid != os.geteuid() or os.geteuid() != 0, "a root node's sandbox has a uid of its own"
    got, n = download(launcher.sr, keys, t.sid, "Uploads/notes.txt", str(tmp_path / "back.txt"))
    assert Path(got).read_bytes() == local.read_bytes() and n == local.stat().st_size
    with pytest.raises(TransferError, match="symlink"):
        (home / "Uploads" / "shadow").symlink_to("/etc/shadow")
        download(launcher.sr, keys, t.sid, "Uploads/shadow", str(tmp_path / "x"))


@pytest.mark.parametrize(
    "path", ["", "/abs", "~/x", "a/../b", "..", "./a", "a//b", "a\\b", "a\x00b", "x" * 2000]
)
def test_transfer_paths_outside_home_or_malformed_are_refused(path: str) -> None:
    with pytest.raises(tx.BadTransfer):
        tx.check_path(path)


def test_a_client_flooding_its_files_stream_is_cut_off_and_the_memory_comes_back(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    """A scripted client writes chunk-sized messages faster than the node reads them (no acks
    awaited, as an honest client does): the node drops its unread messages, counts the flood, and
    the server's memory returns; the session goes on. The session user may XADD without MAXLEN
    (shown first); twice the stream's bound then land in one MULTI (the admin connection's: the session
    user has no MULTI), which is what a pipeline that outruns the node amounts to, without a race."""
    start_pool(r, keys, procs, nodes=1, users=("alice",), grace=30, idle_timeout=30, file_limit=LIMIT)
    launcher = Launcher(r, keys)
    t = launcher.login("alice", "pw")
    wait_for(lambda: session_field(r, keys, t.sid) == "active", 20, what="the session active")
    before = int(r.info("memory")["used_memory"])
    junk = tx.pack(id="x", op="data", seq=0, data=os.urandom(64 * 1024))
    launcher.sr.xadd(keys.files(t.sid), junk)
    p = r.pipeline(transaction=True)
    for _ in range(2 * tx.STREAM_MAXLEN):
        p.xadd(keys.files(t.sid), junk)  # no MAXLEN: a hostile client does not ask for one
    p.execute()

    def flooded() -> int:
        return int(json.loads(r.hget(keys.node("n1"), "stats") or b"{}").get("files_flood", 0))

    wait_for(lambda: flooded() >= 1, 10, what="the flood counted")
    wait_for(lambda: r.xlen(keys.files(t.sid)) <= tx.STREAM_MAXLEN, 5, what="the unread messages dropped")
    wait_for(lambda: int(r.info("memory")["used_memory"]) < before + 4 * tx.CHUNK, 5, what="the memory back")
    assert session_field(r, keys, t.sid) == "active"


def test_an_idle_file_service_reads_rarely_stops_at_once_and_serves_nothing_after_its_stop(
    r: redis.Redis, keys: Keys, redis_url: str, tmp_path: Path
) -> None:
    """With no transfer in progress the service's XREAD blocks IDLE_BLOCK (it polled three times a
    second: every session, awake or asleep, woke the server and its node that often); stopping
    does not wait for that read, and a message the read returns after the stop is not served."""
    import threading
    import time
    from collections import Counter

    from cloudq.workers.files import FileService

    r.hset(keys.settings, "file_limit", LIMIT)
    home = tmp_path / "home"
    home.mkdir()
    conn = redis.Redis.from_url(redis_url)
    svc = FileService(conn, keys, "s1", home, Counter())
    svc.start()
    reads: list[str] = []
    watcher = redis.Redis.from_url(redis_url)

    def watch(m: Any, until: float) -> None:
        for c in m.listen():
            if c["command"].startswith("ECHO") or time.monotonic() > until:
                return
            if c["command"].startswith("XREAD") and keys.files("s1") in c["command"]:
                reads.append(c["command"])

    with watcher.monitor() as m:
        th = threading.Thread(target=watch, args=(m, time.monotonic() + 10), daemon=True)
        th.start()
        time.sleep(1.5)  # the span observed: no condition to wait for, reads are what is counted
        redis.Redis.from_url(redis_url).echo("done")
        th.join(10)
    assert len(reads) <= 1, reads  # 0.3 s blocks made 4 or 5
    thread = svc.thread
    assert thread is not None
    t0 = time.monotonic()
    svc.stop()
    assert time.monotonic() - t0 < 0.5 and thread.is_alive()  # its read still blocked
    r.xadd(keys.files("s1"), tx.pack(id="t1", op="put", name="late.txt", size=3))  # ends that read
    thread.join(5)
    assert not thread.is_alive()
    assert not (home / "Uploads").exists()
    assert r.xlen(keys.fileout("s1")) == 0
    conn.close()
