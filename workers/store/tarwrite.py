"""Writing a user's directory as an uncompressed tar: a walk with directory file descriptors and
``O_NOFOLLOW`` (a symlink swapped in mid-save cannot escape the source), ustar headers built
by hand, and the archive and every file hashed as they stream."""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .manifest import (
    _BLOCK,
    _O_CLOEXEC,
    _O_DIRECTORY,
    _O_NOFOLLOW,
    MAX_DEPTH,
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


class _ArchiveWriter:
    """Appends to an fd through two staging buffers, hashing every byte that reaches the file.

    The caller fills one buffer (headers are copied in, file data is read straight into it with
    :meth:`space` / :meth:`commit`, so it is never copied) while a helper thread hashes the other
    into the archive hash (hashlib releases the GIL on large buffers). This thread writes a buffer
    once its hash is done, at the next hand-off: the helper only hashes, so reads and writes stay in
    one thread (on a small VM, writes racing reads made some saves twice as slow) and the helper
    needs the GIL twice per buffer.
    """

    __slots__ = ("_bufs", "_cur", "_fd", "_fill", "_pending", "_pool", "_views", "hash", "size")

    def __init__(self, fd: int, limit: int, pool: ThreadPoolExecutor) -> None:
        self._fd = fd
        # one tar block more than ``limit``: writes of exactly 1 MiB at 1 MiB-aligned offsets made
        # the kernel's page-cache allocation cost up to 10x more CPU in some saves (measured here,
        # Linux 6.18 ext4: large folios); unaligned ones never did
        limit += _BLOCK
        self._bufs = (bytearray(limit), bytearray(limit))
        self._views = (memoryview(self._bufs[0]), memoryview(self._bufs[1]))
        self._cur = 0
        self._fill = 0
        self._pending: tuple[memoryview, Future[None]] | None = None  # hashed (soon), not yet written
        self._pool = pool
        self.hash = hashlib.sha256()
        self.size = 0

    def space(self) -> memoryview:
        """The free part of the current buffer (never empty): read into it, then :meth:`commit`."""
        view = self._views[self._cur]
        if self._fill == len(view):
            self._hand_off()
            view = self._views[self._cur]
        return view[self._fill :]

    def commit(self, n: int) -> None:
        """``n`` bytes were put at the start of :meth:`space`."""
        self._fill += n
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

    def _write_pending(self) -> None:
        if self._pending is not None:
            view, fut = self._pending
            self._pending = None
            fut.result()  # hashed: the buffer may be written, then reused
            _write_all(self._fd, view)

    def _hand_off(self) -> None:
        """The current buffer is full: the helper hashes it; the previous one is written; the
        caller goes on in the previous one."""
        view = self._views[self._cur][: self._fill]
        fut = self._pool.submit(self.hash.update, view)
        self._write_pending()
        self._pending = (view, fut)
        self._cur ^= 1
        self._fill = 0

    def flush(self) -> None:
        """Everything appended is written and hashed."""
        if self._fill:
            self._hand_off()
        self._write_pending()
