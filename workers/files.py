"""File transfers into and out of a session's HOME on its node (the messages and path rules are
:mod:`cloudq.transfer`'s).

One :class:`FileService` thread per session reads ``session:{sid}:files`` (its own blocking
``XREAD``: the node loop never waits on a transfer), writes uploads into ``~/Uploads`` (a hidden
part file, renamed into place once complete), sends downloads in chunks at most
:data:`~cloudq.transfer.WINDOW` ahead of the client's acks, and lists a directory. Everything is
opened relative to HOME one component at a time with ``O_NOFOLLOW``: a symlink anywhere on the way
is refused, as are ``..``, absolute paths and anything but a regular file. New files and
directories get HOME's owner (the session's sandbox uid when it has one) and a file to download
must belong to that owner, so a node running as root serves nothing the program could not read
itself. The published ``file_limit`` caps every file (0: transfers are refused).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from cloudq import transfer as tx
from cloudq.connection import read_block
from cloudq.keys import Keys
from cloudq.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["FileService"]

MAX_TRANSFERS = 4
BUSY_BLOCK = 0.3
"""Seconds the thread's ``XREAD`` blocks while a transfer is in progress (its idle timeout is checked
between reads)."""
IDLE_BLOCK = 5.0
"""Seconds it blocks while none is (at most half the connection's socket timeout): a session, awake
or asleep, costs the server and the node one read per ``IDLE_BLOCK``, not three a second."""
MAX_LISTING = 1000
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Transfer:
    fd: int
    size: int
    dir_fd: int = -1
    name: str = ""  # put: the final name; part: the hidden one
    part: str = ""
    seq: int = 0  # put: next chunk expected; get: next chunk to send
    acked: int = -1
    done: int = 0  # bytes written or sent
    at: float = field(default_factory=time.monotonic)


class FileService:
    """Serve one session's file transfers from a thread of its own (:meth:`start`, :meth:`stop`)."""

    def __init__(self, r: redis.Redis, keys: Keys, sid: str, home: Path, counters: Counter[str]) -> None:
        self.r, self.home, self.counters = r, Path(home), counters
        self.key_in, self.key_out = keys.files(sid), keys.fileout(sid)
        self.limit = Settings.load(r, keys).file_limit
        self.puts: dict[str, _Transfer] = {}
        self.gets: dict[str, _Transfer] = {}
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.idle_block = read_block(r, IDLE_BLOCK)
        for name in ("uploads", "downloads", "refused", "bytes_in", "bytes_out", "flood"):
            counters[f"files_{name}"] += 0  # the thread adds no key: the node copies them meanwhile

    def start(self) -> None:
        last = self.r.xrevrange(self.key_in, count=1)
        self.thread = threading.Thread(
            target=self.run, args=(last[0][0] if last else b"0-0",), name="files", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        """Stop serving: at once when no transfer is in progress (a read still blocked ends within
        :data:`IDLE_BLOCK` and handles nothing it got), else after the transfers are dropped (2 s at
        most)."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(2 if self.puts or self.gets else 0)
            self.thread = None

    # -- the loop --------------------------------------------------------------------------------
    def run(self, last: bytes) -> None:
        try:
            while not self._stop.is_set():
                block = BUSY_BLOCK if self.puts or self.gets else self.idle_block
                try:
                    resp = self.r.xread({self.key_in: last}, count=16, block=max(1, int(block * 1000)))
                except redis.RedisError as e:
                    log.debug("files: redis: %s", e)
                    self._stop.wait(0.5)
                    continue
                if self._stop.is_set():
                    break  # stopped while the read was blocked: what it got is not served
                if resp and self._flooded():
                    continue
                for _, entries in resp or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        self.handle(fields)
                    with contextlib.suppress(redis.RedisError):  # read: of no more use
                        self.r.xdel(self.key_in, *[e for e, _ in entries])
                self._expire()
        finally:
            for tid in list(self.puts):
                self._drop_put(tid)
            for tid in list(self.gets):
                self._drop_get(tid)

    def _flooded(self) -> bool:
        """A client that writes more than a transfer's window ahead of what this thread reads (the
        honest client never does: it waits for acks) fills the server's memory, which every tenant
        shares: its unread messages are dropped (XTRIM, not DEL, so its last id stays), its
        transfers end with an error, and it is counted. Checked before each read, so the stream
        never holds much more than a pipeline's worth."""
        try:
            n = self.r.xlen(self.key_in)
            if n <= tx.STREAM_MAXLEN:
                return False
            self.r.xtrim(self.key_in, maxlen=0, approximate=False)
        except redis.RedisError as e:
            log.debug("files: redis: %s", e)
            return False
        self.counters["files_flood"] += 1
        log.warning("files: %d unread messages (more than %d): dropped", n, tx.STREAM_MAXLEN)
        for tid in list(self.puts) + list(self.gets):
            self._drop_put(tid)
            self._drop_get(tid)
            with contextlib.suppress(redis.RedisError):
                self.reply(tid, "error", error="too many file messages at once")
        return True

    def handle(self, fields: dict[Any, Any]) -> None:
        tid = ""
        try:
            msg = tx.unpack(fields)
            tid, op = msg["id"], msg["op"]
            if op in ("put", "get", "list") and self.limit == 0:
                raise tx.BadTransfer("file transfers are off on this service")
            getattr(self, f"_{op}")(tid, msg)
        except (tx.BadTransfer, OSError) as e:
            self.counters["files_refused"] += 1
            why = str(e) if isinstance(e, tx.BadTransfer) else self._os_words(e)
            log.info("files: transfer %s refused: %s", tid or "-", why)
            if tid:
                self._drop_put(tid)
                self._drop_get(tid)
                self.reply(tid, "error", error=why)

    def reply(self, tid: str, op: str, **body: Any) -> None:
        self.r.xadd(self.key_out, tx.pack(id=tid, op=op, **body), maxlen=tx.STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]

    @staticmethod
    def _os_words(e: OSError) -> str:
        import errno

        if e.errno in (errno.ELOOP, errno.ENOTDIR) or isinstance(e, NotADirectoryError):
            return "symlinks are refused (and the path must lead through directories)"
        if isinstance(e, FileNotFoundError):
            return "no such file"
        if isinstance(e, FileExistsError):
            return "a transfer of that name is in progress"
        return e.strerror or type(e).__name__

    def _expire(self) -> None:
        now = time.monotonic()
        for table, drop in ((self.puts, self._drop_put), (self.gets, self._drop_get)):
            for tid in [t for t, x in table.items() if now - x.at > tx.IDLE_TIMEOUT]:
                log.info("files: transfer %s timed out", tid)
                drop(tid)

    # -- paths -------------------------------------------------------------------------------------
    def _owner(self) -> tuple[int, int]:
        st = os.stat(self.home)
        return st.st_uid, st.st_gid

    def _open_dir(self, parts: list[str], create: bool = False) -> int:
        """A descriptor of HOME/parts..., each component opened without following a symlink."""
        fd = os.open(self.home, _DIR)
        try:
            for p in parts:
                try:
                    nfd = os.open(p, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(p, 0o755, dir_fd=fd)
                    os.chown(p, *self._owner(), dir_fd=fd, follow_symlinks=False)
                    nfd = os.open(p, _DIR, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _size(self, size: Any) -> int:
        if type(size) is not int or size < 0:
            raise tx.BadTransfer("bad size")
        if size > self.limit:
            raise tx.BadTransfer(f"the file is larger than the service's limit of {self.limit} bytes")
        return size

    # -- operations ----------------------------------------------------------------------------------
    def _put(self, tid: str, msg: dict[str, Any]) -> None:
        name, size = tx.check_name(msg.get("name")), self._size(msg.get("size"))
        if tid in self.puts or len(self.puts) + len(self.gets) >= MAX_TRANSFERS:
            raise tx.BadTransfer("too many transfers at once")
        dfd = self._open_dir([tx.UPLOADS], create=True)
        part = f".{name}.part-{tid}"[:255]
        try:
            fd = os.open(
                part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd
            )
        except BaseException:
            os.close(dfd)
            raise
        os.fchown(fd, *self._owner())
        self.puts[tid] = _Transfer(fd, size, dfd, name, part)
        self.reply(tid, "ack", seq=-1)

    def _data(self, tid: str, msg: dict[str, Any]) -> None:
        t = self.puts.get(tid)
        if t is None:
            raise tx.BadTransfer("no such upload")
        data = msg.get("data")
        if msg.get("seq") != t.seq or not isinstance(data, bytes) or len(data) > tx.CHUNK:
            raise tx.BadTransfer("chunk out of order or malformed")
        if t.done + len(data) > t.size:
            raise tx.BadTransfer("more bytes than the upload announced")
        view = memoryview(data)
        while view:
            view = view[os.write(t.fd, view) :]
        t.done += len(data)
        t.seq += 1
        t.at = time.monotonic()
        self.counters["files_bytes_in"] += len(data)
        if not msg.get("last"):
            self.reply(tid, "ack", seq=t.seq - 1)
            return
        if t.done != t.size:
            raise tx.BadTransfer(f"the upload ended at {t.done} of {t.size} bytes")
        os.close(t.fd)
        t.fd = -1
        os.rename(t.part, t.name, src_dir_fd=t.dir_fd, dst_dir_fd=t.dir_fd)
        os.close(t.dir_fd)
        del self.puts[tid]
        self.counters["files_uploads"] += 1
        log.info("files: uploaded %s/%s (%d bytes)", tx.UPLOADS, t.name, t.size)
        self.reply(tid, "done", path=f"{tx.UPLOADS}/{t.name}", size=t.size)

    def _get(self, tid: str, msg: dict[str, Any]) -> None:
        parts = tx.check_path(msg.get("path"))
        if tid in self.gets or len(self.puts) + len(self.gets) >= MAX_TRANSFERS:
            raise tx.BadTransfer("too many transfers at once")
        dfd = self._open_dir(parts[:-1])
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise tx.BadTransfer("not a regular file")
            if st.st_uid != self._owner()[0]:
                raise tx.BadTransfer("the file does not belong to the session's user")
            self._size(st.st_size)
        except BaseException:
            os.close(fd)
            raise
        os.set_blocking(fd, True)
        self.gets[tid] = t = _Transfer(fd, st.st_size)
        self.reply(tid, "meta", size=t.size, name=parts[-1])
        self._send(tid, t)

    def _ack(self, tid: str, msg: dict[str, Any]) -> None:
        t = self.gets.get(tid)
        seq = msg.get("seq")
        if t is None or type(seq) is not int:
            return  # a late ack of a finished download
        t.acked, t.at = max(t.acked, seq), time.monotonic()
        self._send(tid, t)

    def _send(self, tid: str, t: _Transfer) -> None:
        while t.seq <= t.acked + tx.WINDOW:
            data = os.read(t.fd, min(tx.CHUNK, t.size - t.done)) if t.done < t.size else b""
            t.done += len(data)
            last = t.done >= t.size or not data
            self.reply(tid, "data", seq=t.seq, data=data, last=last)
            self.counters["files_bytes_out"] += len(data)
            t.seq += 1
            if last:
                self.counters["files_downloads"] += 1
                self._drop_get(tid)
                return

    def _list(self, tid: str, msg: dict[str, Any]) -> None:
        dfd = self._open_dir(tx.check_path(msg.get("path")))
        try:
            entries = []
            for e in os.scandir(dfd):
                if e.is_file(follow_symlinks=False) and not e.name.startswith("."):
                    entries.append([e.name, e.stat(follow_symlinks=False).st_size])
                if len(entries) >= MAX_LISTING:
                    break
        finally:
            os.close(dfd)
        self.reply(tid, "listing", entries=sorted(entries))

    def _abort(self, tid: str, msg: dict[str, Any]) -> None:
        self._drop_put(tid)
        self._drop_get(tid)

    def _drop_put(self, tid: str) -> None:
        t = self.puts.pop(tid, None)
        if t is None:
            return
        if t.fd >= 0:
            os.close(t.fd)
        with contextlib.suppress(OSError):
            os.unlink(t.part, dir_fd=t.dir_fd)
        os.close(t.dir_fd)

    def _drop_get(self, tid: str) -> None:
        t = self.gets.pop(tid, None)
        if t is not None:
            os.close(t.fd)
