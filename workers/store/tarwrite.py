"""Writing a user's directory as an uncompressed tar: a walk with directory file descriptors and
``O_NOFOLLOW`` (a symlink swapped in mid-save cannot escape the source), ustar headers built
by hand, every file and the archive's member digest hashed as they stream."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import logging
import marshal
import mmap
import os
import select
import signal
import stat
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .manifest import (
    _BLOCK,
    _O_CLOEXEC,
    _O_DIRECTORY,
    _O_NOFOLLOW,
    MAX_DEPTH,
    MemberDigest,
    SourceError,
    StoreError,
    UnsafeSource,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; called with non-decreasing ``done_bytes`` per attempt."""

# --------------------------------------------------------------------------------------------------
# Helpers


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:  # some network filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _store_error(action: str, path: str | os.PathLike[str], e: OSError) -> StoreError:
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT or e.errno == errno.EFBIG:
        why = "store is full (or a file size limit was hit)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "store is not writable"
    elif e.errno in (errno.ENOTDIR, errno.ENOENT):
        why = "store path is not a usable directory"
    else:
        why = "I/O error"
    return StoreError(f"{action} failed: {why}: {path}: {e.strerror or e}")


def _tar_header(name: str, *, is_dir: bool, size: int, mode: int, mtime: float) -> bytes:
    """One tar header (ustar, pax extension only when needed: long names, huge sizes).

    The common case is built directly (tarfile's generic encoder costs ~20 us per member, which
    dominates saving many small files); the result is byte-identical to ``tarfile``'s PAX output.
    """
    bname = name.encode("utf-8") + (b"/" if is_dir else b"")
    mt = max(0, int(mtime))
    if len(bname) <= 100 and size < 8**11 and mt < 8**11 and bname.isascii():
        hdr = bytearray(_USTAR_TEMPLATE)
        fmode = b"%07o\0" % (mode & 0o777)
        fsize = b"%011o\0" % (0 if is_dir else size)
        fmtime = b"%011o\0" % mt
        kind = 0x35 if is_dir else 0x30  # DIRTYPE '5' / REGTYPE '0'
        hdr[0 : len(bname)] = bname
        hdr[100:108] = fmode
        hdr[124:136] = fsize
        hdr[136:148] = fmtime
        hdr[156] = kind
        # the checksum of the whole header: the template's (zeros where these fields go) plus theirs
        chk = _USTAR_TEMPLATE_SUM + sum(bname) + sum(fmode) + sum(fsize) + sum(fmtime) + kind
        hdr[148:155] = b"%06o\0" % chk
        return bytes(hdr)
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    ti.size = 0 if is_dir else size
    ti.mode = mode & 0o777
    ti.mtime = mt
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def _ustar_template() -> bytes:
    hdr = bytearray(_BLOCK)
    hdr[108:116] = b"0000000\0"  # uid
    hdr[116:124] = b"0000000\0"  # gid
    hdr[148:156] = b" " * 8  # checksum field counts as spaces
    hdr[257:265] = tarfile.POSIX_MAGIC  # b"ustar\x0000"
    # devmajor/devminor stay NUL, as tarfile writes them for non-device members
    return bytes(hdr)


_USTAR_TEMPLATE = _ustar_template()
_USTAR_TEMPLATE_SUM = sum(_USTAR_TEMPLATE)


@dataclass(slots=True)
class _SrcEntry:
    rel: str
    is_dir: bool
    dir_fd: int  # fd of the entry itself for directories, of its parent for files
    name: str


def _walk_source(root: str) -> Iterator[_SrcEntry]:
    """Depth-first, sorted walk of ``root`` using directory fds and O_NOFOLLOW.

    Yields directories (before their content) and regular files; raises ``UnsafeSource`` on
    anything else. The yielded fds are valid only until the next item is requested.
    """
    try:
        root_fd = os.open(root, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(root):
            raise UnsafeSource(f"source directory {root} is a symlink") from e
        raise SourceError(f"cannot open source directory {root}: {e.strerror}") from e
    try:
        yield from _walk_dir(root_fd, "", root, 0)
    finally:
        os.close(root_fd)


def _walk_dir(dfd: int, rel: str, root: str, depth: int) -> Iterator[_SrcEntry]:
    if depth > MAX_DEPTH:
        raise UnsafeSource(f"{root}/{rel}: directory tree deeper than {MAX_DEPTH}")
    try:
        with os.scandir(dfd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"cannot list {root}/{rel}: {e.strerror}") from e
    for e in entries:
        name = e.name
        relp = f"{rel}/{name}" if rel else name
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsafeSource(f"{root}/{relp!r}: file name is not valid UTF-8") from None
        if e.is_file(follow_symlinks=False):
            yield _SrcEntry(relp, False, dfd, name)
        elif e.is_dir(follow_symlinks=False):
            try:
                sub = os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dfd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeSource(f"{root}/{relp}: changed into a non-directory during save") from err
                raise SourceError(f"cannot open {root}/{relp}: {err.strerror}") from err
            try:
                yield _SrcEntry(relp, True, sub, name)
                yield from _walk_dir(sub, relp, root, depth + 1)
            finally:
                os.close(sub)
        else:
            try:
                st_mode = e.stat(follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            raise UnsafeSource(f"{root}/{relp}: refusing to save a {_kind(st_mode)}")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return f"special file (mode {mode:o})"


_META, _BEGIN, _DATA, _END = range(4)

HASH_TIMEOUT = 60.0
"""How long a hashing process may take over one buffer (about a millisecond's work) before the
save fails; 0 = no bound."""

Ops = list[list[int]]
"""What to do with a buffer, in order: ``[kind, start, end]``, kind one of _META, _BEGIN, _DATA,
_END (a file's data between _BEGIN and _END, archive metadata otherwise)."""


def _apply(d: MemberDigest, view: memoryview, ops: Ops) -> list[str]:
    """Hash one buffer; the sha256s (hex) of the files that ended in it."""
    ended: list[str] = []
    for kind, a, b in ops:
        if kind == _META:
            d.meta(view[a:b])
        elif kind == _DATA:
            d.data(view[a:b])
        elif kind == _BEGIN:
            d.begin_file()
        else:
            ended.append(d.end_file())
    return ended


class _ThreadHasher:
    """Hashes the writer's buffers on a helper thread."""

    def __init__(self, views: tuple[memoryview, memoryview]) -> None:
        self._views = views
        self._digest = MemberDigest()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-hash")

    def submit(self, idx: int, n: int, ops: Ops) -> Future[list[str]]:
        return self._pool.submit(_apply, self._digest, self._views[idx][:n], ops)

    def wait(self, handle: Future[list[str]]) -> list[str]:
        return handle.result()

    def finish(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _ProcessHasher:
    """Hashes the writer's buffers (shared memory) in a forked child process.

    A helper *thread* needs the GIL back after every file it hashes, and each time it takes it the
    reading thread, which releases it for every system call, waits for it: with thousands of small
    files the two threads hand the GIL back and forth thousands of times and the save takes 1.5x
    as long as reading alone (measured here: 100 MiB in 3,171 files, 148 ms with a thread, 112 ms
    with this child, 97 ms not hashing at all). The child runs only hashing: it shares the two
    buffers, reads what to hash from a pipe, answers each buffer's file sha256s and exits on EOF, so
    a killed parent leaves no child behind; a child that dies or hangs makes the save fail.
    """

    def __init__(self, views: tuple[memoryview, memoryview], timeout: float) -> None:
        self._timeout = timeout or None
        template = hashlib.sha256()  # the child copies it: no algorithm lookup (and lock) after fork
        cmd_r, self._cmd = os.pipe()
        self._ack, ack_w = os.pipe()
        try:
            self.pid = os.fork()
        except OSError:
            for fd in (cmd_r, self._cmd, self._ack, ack_w):
                os.close(fd)
            raise
        if self.pid == 0:  # the child: no logging, no locks, nothing but hashing
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                lo, hi = sorted((cmd_r, ack_w))
                os.closerange(3, lo)
                os.closerange(lo + 1, hi)
                os.closerange(hi + 1, 1 << 20)
                _hash_child(cmd_r, ack_w, views, template)
                code = 0
            finally:
                os._exit(code)
        os.close(cmd_r)
        os.close(ack_w)

    def submit(self, idx: int, n: int, ops: Ops) -> None:
        _send(self._cmd, (idx, n, ops))

    def wait(self, handle: None) -> list[str]:
        ended = _recv(self._ack, self._timeout)
        if not isinstance(ended, list):
            raise StoreError("the save's hashing process answered nonsense")
        return ended

    def finish(self) -> str:
        _send(self._cmd, None)
        digest = _recv(self._ack, self._timeout)
        if not isinstance(digest, str):
            raise StoreError("the save's hashing process answered nonsense")
        return digest

    def close(self) -> None:
        for fd in (self._cmd, self._ack):
            with contextlib.suppress(OSError):
                os.close(fd)
        # the child exits on EOF; one that does not within half a second (stopped, stuck) is killed
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(self.pid)
            try:
                select.select([pidfd], [], [], 0.5)  # readable once the child has exited
            finally:
                os.close(pidfd)
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def _hash_child(cmd: int, ack: int, views: tuple[memoryview, memoryview], template: Any) -> None:
    d = MemberDigest(new=template.copy)
    while True:
        msg = _recv(cmd, None)
        if msg is None:
            _send(ack, d.hexdigest())
            return
        idx, n, ops = msg
        _send(ack, _apply(d, views[idx][:n], ops))


def _send(fd: int, obj: object) -> None:
    data = marshal.dumps(obj)
    _write_all(fd, len(data).to_bytes(4, "little") + data)


def _recv(fd: int, timeout: float | None) -> Any:
    """One message; raises StoreError if the peer is gone or silent for ``timeout`` s."""
    head = _read_n(fd, 4, timeout)
    return marshal.loads(_read_n(fd, int.from_bytes(head, "little"), timeout))


def _read_n(fd: int, n: int, timeout: float | None) -> bytes:
    out = bytearray()
    while len(out) < n:
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            raise StoreError(f"the save's hashing process did not answer within {timeout:g} s")
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise StoreError("the save's hashing process died")
        out += chunk
    return bytes(out)


class _ArchiveWriter:
    """Appends to an fd through two staging buffers; a helper (a thread, or for big saves a forked
    process: :class:`_ProcessHasher` says why) hashes what was appended.

    The caller fills one buffer (headers are copied in, file data is read straight into it with
    :meth:`space` / :meth:`commit`, so it is never copied) while the helper hashes the other: each
    file's data into that file's sha256, the rest and those sha256s into the archive's
    :class:`MemberDigest`, so every byte is hashed once. This thread writes a buffer once its
    hashing is done, at the next hand-off: the helper only hashes, so reads and writes stay in one
    thread (on a small VM, writes racing reads made some saves twice as slow). After :meth:`flush`,
    :attr:`file_digests` holds each file's sha256 (hex), in order, and :attr:`digest` the archive's.
    Call :meth:`close` in any case.
    """

    __slots__ = (
        "_cur",
        "_fd",
        "_fill",
        "_hasher",
        "_in_file",
        "_maps",
        "_ops",
        "_pending",
        "_views",
        "digest",
        "file_digests",
        "size",
    )

    def __init__(self, fd: int, limit: int, *, process: bool, timeout: float = HASH_TIMEOUT) -> None:
        self._fd = fd
        # one tar block more than ``limit``: writes of exactly 1 MiB at 1 MiB-aligned offsets made
        # the kernel's page-cache allocation cost up to 10x more CPU in some saves (measured here,
        # Linux 6.18 ext4: large folios); unaligned ones never did
        limit += _BLOCK
        self._maps = (mmap.mmap(-1, limit), mmap.mmap(-1, limit))  # shared with a forked helper
        self._views = (memoryview(self._maps[0]), memoryview(self._maps[1]))
        self._cur = 0
        self._fill = 0
        self._ops: Ops = []  # what the helper does with the current buffer
        self._in_file = False
        self._pending: tuple[memoryview, Any] | None = None  # hashed (soon), not yet written
        self._hasher: _ThreadHasher | _ProcessHasher = (
            _ProcessHasher(self._views, timeout) if process else _ThreadHasher(self._views)
        )
        self.digest = ""
        self.file_digests: list[str] = []
        self.size = 0

    def space(self) -> memoryview:
        """The free part of the current buffer (never empty): read into it, then :meth:`commit`."""
        view = self._views[self._cur]
        if self._fill == len(view):
            self._hand_off()
            view = self._views[self._cur]
        return view[self._fill :]

    def commit(self, n: int) -> None:
        """``n`` bytes were put at the start of :meth:`space`: file data between :meth:`begin_file`
        and :meth:`end_file`, archive metadata otherwise."""
        kind = _DATA if self._in_file else _META
        ops = self._ops
        start = self._fill
        if ops and ops[-1][0] == kind and ops[-1][2] == start:
            ops[-1][2] = start + n
        else:
            ops.append([kind, start, start + n])
        self._fill = start + n
        self.size += n

    def write(self, data: bytes | memoryview) -> None:
        """Append a small piece (copied into the buffer)."""
        view = memoryview(data)
        while view:
            free = self.space()
            n = min(len(free), len(view))
            free[:n] = view[:n]
            self.commit(n)
            view = view[n:]

    def begin_file(self) -> None:
        self._ops.append([_BEGIN, 0, 0])
        self._in_file = True

    def end_file(self) -> None:
        self._ops.append([_END, 0, 0])
        self._in_file = False

    def _write_pending(self) -> None:
        if self._pending is not None:
            view, handle = self._pending
            self._pending = None
            self.file_digests += self._hasher.wait(handle)  # hashed: may be written, then reused
            _write_all(self._fd, view)

    def _hand_off(self) -> None:
        """The current buffer is full: the helper hashes it; the previous one is written; the
        caller goes on in the previous one."""
        handle = self._hasher.submit(self._cur, self._fill, self._ops)
        view = self._views[self._cur][: self._fill]
        self._ops = []
        self._write_pending()
        self._pending = (view, handle)
        self._cur ^= 1
        self._fill = 0

    def flush(self) -> None:
        """Everything appended is written and hashed."""
        if self._fill or self._ops:
            self._hand_off()
        self._write_pending()
        self.digest = self._hasher.finish()

    def close(self) -> None:
        self._pending = None
        self._hasher.close()  # the buffers go with this object (views of them may still exist)
