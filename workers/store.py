"""Versioned, checksummed snapshots of each user's data directory.

``Store`` is the interface the data-management jobs (mount = :meth:`Store.restore`, save =
:meth:`Store.save`) program against; :class:`DirectoryStore` implements it on a directory that is
local or shared between hosts (NFS, CephFS, ...). An object-store backend is one more module
implementing the same protocol.

Layout of a :class:`DirectoryStore`::

    <root>/<user>/00000007.tar    uncompressed tar of the user's directory (regular files + dirs)
    <root>/<user>/00000007.json   manifest: every file's relative path, size, sha256 and mode,
                                  the directories, total size, creation time, archive size+sha256
    <root>/<user>/.tmp.*          in-flight temp files (ignored by readers, removed once stale)

Crash safety. A save streams the archive into a temp file in the user's directory (hashing every
file and the archive as it goes, so nothing is read twice), fsyncs it, publishes it under its final
name with ``link()`` (fails with ``EEXIST`` instead of overwriting, so two racing writers fail
loudly), fsyncs the directory, and then does the same with the manifest. The manifest appearing is
the commit point: a version exists for readers only when its manifest exists and parses completely.
A crash at any moment leaves the previous versions untouched plus, at worst, a temp file or an
archive without manifest; both are invisible and cleaned up later (temp files as soon as their
writer is known to be dead or they are older than ``stale_seconds``; archives without manifest
when older than ``stale_seconds`` or when pruning passes them).

Version numbers are ``max(any NNNNNNNN.tar/.json in the directory) + 1``, so they only increase
and never reuse the number of a half-written version. Concurrent writers of one user must be
serialised by the caller (a lock); if they are not, one of them fails with
:class:`VersionExists` rather than clobbering the other. After each successful save or promote the
newest ``keep`` valid versions are kept and everything numbered below them is removed.

Safety rules.

* User names must match ``^[A-Za-z0-9_@-][A-Za-z0-9_.@-]{0,63}$`` (no ``/``, no NUL, no leading dot,
  hence never ``.`` or ``..``).
* Save **refuses** (:class:`UnsafeSource`) a source containing symlinks, device nodes, FIFOs,
  sockets or names that are not valid UTF-8, rather than silently skipping them: a snapshot that
  quietly misses files is worse than a save that fails loudly and leaves the last good version.
  The source tree is walked with directory file descriptors and ``O_NOFOLLOW``, so swapping a
  directory for a symlink during the save cannot make the store archive files outside the source.
  Only permission bits (``0o777``) and mtimes are kept; owners are not (restored files belong to the
  restoring process).
* The per-user quota (total bytes of regular files) is checked before anything is written.
* Restore refuses (:class:`UnsafeArchive`) members that are absolute, contain ``..``/``.``/empty
  components, or are anything but regular files and directories (symlinks, hard links, devices,
  FIFOs, sparse/continuation members), and every member must match the manifest (path, size,
  sha256). It extracts into a fresh temp directory next to ``dest_dir`` and only then renames it
  into place, so a failed restore leaves ``dest_dir`` as it was. ``dest_dir`` is *replaced*
  entirely; it must be a plain directory (not a mount point) whose parent is writable.
* Restore verifies the data it writes (per-file sha256 + tar header checksums + exact member list);
  :meth:`DirectoryStore.verify` additionally checks the sha256 of the whole archive file.
* Any ``OSError`` on the store side (not writable, ``ENOSPC``, ...) becomes :class:`StoreError` with a
  clear message, after removing this save's temp files; committed versions are never touched.

Restored files are not fsynced by default (``fsync_restore=False``): a workspace is a scratch copy
that is re-mounted from the store after a host crash, and GNU tar does not fsync either.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; called with non-decreasing ``done_bytes`` per attempt."""

MANIFEST_FORMAT = 1
DEFAULT_KEEP = 5
DEFAULT_QUOTA_BYTES = 100 * 1024 * 1024
DEFAULT_STALE_SECONDS = 3600.0
CHUNK_SIZE = 1024 * 1024
MAX_DEPTH = 256

USER_RE = re.compile(r"^[A-Za-z0-9_@-][A-Za-z0-9_.@-]{0,63}$")
_VERSION_FILE_RE = re.compile(r"^(\d{8})\.(tar|json)$")
_TMP_RE = re.compile(r"^\.tmp\.([0-9a-f]{12})\.(\d+)\.[0-9a-f]+\.(tar|json)$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCKS = bytes(2 * _BLOCK)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_HOST_ID = hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Errors


class StoreError(Exception):
    """Base class of every error raised by a store."""


class InvalidUserName(StoreError, ValueError):
    """The user name is not safe to use as a directory name."""


class UnsafeSource(StoreError):
    """The directory to save contains something the store refuses (symlink, device, FIFO, ...)."""


class SourceError(StoreError):
    """The directory to save is missing, unreadable, or changed while being saved."""


class QuotaExceeded(StoreError):
    """The directory to save is larger than the user's quota. Nothing was written."""


class VersionNotFound(StoreError, LookupError):
    """No such (complete) version."""


class CorruptVersion(StoreError):
    """A version's archive does not match its manifest (bit rot, truncation, tampering)."""


class UnsafeArchive(CorruptVersion):
    """An archive holds a member that could write outside the destination or is not a plain file/dir."""


class NoGoodVersion(StoreError):
    """Restore found no version that verifies."""


class NoVersions(NoGoodVersion, VersionNotFound):
    """The user has no saved version at all (a new user): start from an empty directory."""


class VersionExists(StoreError):
    """Another writer published the same version number first (callers must serialise saves)."""


# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # relative, "/"-separated
    size: int
    sha256: str
    mode: int  # permission bits only


@dataclass(frozen=True, slots=True)
class VersionInfo:
    user: str
    version: int
    created: str  # ISO 8601, UTC
    file_count: int
    total_size: int  # bytes of file content
    archive_size: int
    archive_sha256: str
    promoted_from: int | None = None  # set on versions made by promote()
    fell_back_from: int | None = None  # restore(): newest version that failed verification
    skipped: tuple[int, ...] = ()  # restore(): every version that failed, newest first


@dataclass(frozen=True, slots=True)
class Manifest:
    user: str
    version: int
    created: str
    files: tuple[FileEntry, ...]
    dirs: tuple[str, ...]
    total_size: int
    archive_size: int
    archive_sha256: str
    promoted_from: int | None = None
    format: int = MANIFEST_FORMAT

    def info(self) -> VersionInfo:
        return VersionInfo(
            user=self.user,
            version=self.version,
            created=self.created,
            file_count=len(self.files),
            total_size=self.total_size,
            archive_size=self.archive_size,
            archive_sha256=self.archive_sha256,
            promoted_from=self.promoted_from,
        )

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": self.format,
            "user": self.user,
            "version": self.version,
            "created": self.created,
            "promoted_from": self.promoted_from,
            "total_size": self.total_size,
            "archive_size": self.archive_size,
            "archive_sha256": self.archive_sha256,
            "dirs": list(self.dirs),
            "files": [[f.path, f.size, f.sha256, f.mode] for f in self.files],
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate a manifest; ``ValueError`` if it is incomplete or inconsistent."""
        try:
            doc = json.loads(data.decode("utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
                raise ValueError("unknown manifest format")
            files = tuple(
                FileEntry(_check_rel(p), _check_int(s), _check_hex(h), _check_int(m) & 0o777)
                for p, s, h, m in doc["files"]
            )
            dirs = tuple(_check_rel(d) for d in doc["dirs"])
            promoted = doc.get("promoted_from")
            m = cls(
                user=_check_user(doc["user"]),
                version=_check_int(doc["version"]),
                created=str(doc["created"]),
                files=files,
                dirs=dirs,
                total_size=_check_int(doc["total_size"]),
                archive_size=_check_int(doc["archive_size"]),
                archive_sha256=_check_hex(doc["archive_sha256"]),
                promoted_from=None if promoted is None else _check_int(promoted),
            )
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError, InvalidUserName) as e:
            raise ValueError(f"invalid manifest: {e}") from e
        if m.total_size != sum(f.size for f in files):
            raise ValueError("invalid manifest: total_size does not match the files")
        if len({f.path for f in files} | set(dirs)) != len(files) + len(dirs):
            raise ValueError("invalid manifest: duplicate paths")
        return m


def _check_int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return v


def _check_hex(v: object) -> str:
    if not isinstance(v, str) or not _HEX64_RE.match(v):
        raise ValueError(f"expected a sha256 hex digest, got {v!r}")
    return v


def _check_rel(path: object) -> str:
    """A safe relative path: no leading '/', no '', '.', '..' components, no NUL or backslash."""
    if not isinstance(path, str) or not path or "\0" in path or "\\" in path or path.startswith("/"):
        raise ValueError(f"unsafe path {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"unsafe path {path!r}")
    return path


def _check_user(user: object) -> str:
    if not isinstance(user, str) or not USER_RE.match(user):
        raise InvalidUserName(
            f"invalid user name {user!r}: need 1-64 of [A-Za-z0-9_.@-], not starting with '.'"
        )
    return user


validate_user = _check_user


# --------------------------------------------------------------------------------------------------
# Interface


@runtime_checkable
class Store(Protocol):
    """Where users' data directories are saved as versioned, checksummed snapshots."""

    def save(
        self, user: str, src_dir: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> VersionInfo:
        """Snapshot ``src_dir`` as the user's new newest version."""
        ...

    def restore(
        self,
        user: str,
        dest_dir: str | os.PathLike[str],
        version: int | None = None,
        *,
        progress: Progress | None = None,
    ) -> VersionInfo:
        """Replace ``dest_dir`` with a version (newest good one when ``None``, falling back)."""
        ...

    def versions(self, user: str) -> list[VersionInfo]:
        """Complete versions, oldest first."""
        ...

    def show(self, user: str, version: int | None = None) -> Manifest:
        """The manifest of a version (newest when ``None``)."""
        ...

    def promote(self, user: str, version: int, *, progress: Progress | None = None) -> VersionInfo:
        """Copy an old version as the new newest version."""
        ...

    def verify(self, user: str, version: int) -> bool:
        """Whether the version's archive matches its manifest's size and sha256."""
        ...


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
        hdr[0 : len(bname)] = bname
        hdr[100:108] = b"%07o\0" % (mode & 0o777)
        hdr[124:136] = b"%011o\0" % (0 if is_dir else size)
        hdr[136:148] = b"%011o\0" % mt
        hdr[156] = 0x35 if is_dir else 0x30  # DIRTYPE '5' / REGTYPE '0'
        hdr[148:155] = b"%06o\0" % sum(hdr)
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
    """Appends to an fd, hashing every byte that reaches the file.

    Small pieces (headers, small files) are gathered in a buffer; large chunks go straight to the
    file. The archive hash runs on a helper thread, overlapping the per-file hash and the write
    (hashlib and os.write release the GIL on large buffers), so streaming costs about one hash pass.
    """

    __slots__ = ("_buf", "_fd", "_limit", "_pool", "hash", "size")

    def __init__(self, fd: int, limit: int, pool: ThreadPoolExecutor) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._limit = limit
        self._pool = pool
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append a small piece (copied into the buffer)."""
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= self._limit:
            self.flush()

    def write_chunk(self, data: memoryview, file_hash: Any) -> None:
        """Append a large chunk of file data, also feeding ``file_hash`` (the caller's per-file hash)."""
        self.flush()
        fut = self._pool.submit(self.hash.update, data)
        try:
            file_hash.update(data)
            _write_all(self._fd, data)
        finally:
            fut.result()
        self.size += len(data)

    def flush(self) -> None:
        if self._buf:
            fut = self._pool.submit(self.hash.update, self._buf)
            try:
                _write_all(self._fd, self._buf)
            finally:
                fut.result()
            self._buf.clear()


# --------------------------------------------------------------------------------------------------
# DirectoryStore


class DirectoryStore(Store):
    """A :class:`Store` in a directory (local or shared between hosts). See the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep: int = DEFAULT_KEEP,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        fsync: bool = True,
        fsync_restore: bool = False,
        stale_seconds: float = DEFAULT_STALE_SECONDS,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        if quota_bytes < 0:
            raise ValueError("quota_bytes must be >= 0")
        self.root = Path(root)
        self.keep = keep
        self.quota_bytes = quota_bytes
        self.fsync = fsync
        self.fsync_restore = fsync_restore
        self.stale_seconds = stale_seconds
        self.chunk_size = max(64 * 1024, chunk_size)

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r}, keep={self.keep}, quota_bytes={self.quota_bytes})"

    # ---- paths & listing ------------------------------------------------------------------------

    def user_dir(self, user: str) -> Path:
        return self.root / _check_user(user)

    def _archive(self, udir: Path, version: int) -> Path:
        return udir / f"{version:08d}.tar"

    def _manifest_path(self, udir: Path, version: int) -> Path:
        return udir / f"{version:08d}.json"

    def _listdir(self, udir: Path) -> list[str]:
        try:
            return os.listdir(udir)
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            return []

    def _load(self, udir: Path, version: int) -> Manifest:
        path = self._manifest_path(udir, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VersionNotFound(f"{udir.name}: no version {version}") from None
        except OSError as e:
            raise StoreError(f"cannot read manifest {path}: {e.strerror}") from e
        try:
            m = Manifest.from_json(data)
        except ValueError as e:
            log.warning("ignoring incomplete or invalid manifest %s: %s", path, e)
            raise VersionNotFound(f"{udir.name}: version {version} is incomplete ({e})") from None
        if m.version != version or m.user != udir.name:
            log.warning("ignoring manifest %s: it names %s version %s", path, m.user, m.version)
            raise VersionNotFound(f"{udir.name}: version {version} has a mismatched manifest")
        return m

    def _manifests(self, udir: Path) -> list[Manifest]:
        """Valid manifests, oldest first. Invalid ones are logged and skipped."""
        found = []
        for name in self._listdir(udir):
            mo = _VERSION_FILE_RE.match(name)
            if mo and mo.group(2) == "json":
                with contextlib.suppress(VersionNotFound):
                    found.append(self._load(udir, int(mo.group(1))))
        found.sort(key=lambda m: m.version)
        return found

    def versions(self, user: str) -> list[VersionInfo]:
        return [m.info() for m in self._manifests(self.user_dir(user))]

    def show(self, user: str, version: int | None = None) -> Manifest:
        udir = self.user_dir(user)
        if version is not None:
            return self._load(udir, version)
        ms = self._manifests(udir)
        if not ms:
            raise NoVersions(f"{user}: no saved versions")
        return ms[-1]

    # ---- verify ---------------------------------------------------------------------------------

    def verify(self, user: str, version: int) -> bool:
        udir = self.user_dir(user)
        m = self._load(udir, version)
        path = self._archive(udir, version)
        try:
            digest, size = self._hash_file(path)
        except OSError as e:
            log.warning("%s version %d: cannot read archive %s: %s", user, version, path, e)
            return False
        ok = size == m.archive_size and digest == m.archive_sha256
        if not ok:
            log.warning("%s version %d: archive %s does not match its manifest", user, version, path)
        return ok

    def _hash_file(self, path: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        buf = bytearray(self.chunk_size)
        view = memoryview(buf)
        size = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                size += n
        return h.hexdigest(), size

    # ---- save -----------------------------------------------------------------------------------

    def save(
        self, user: str, src_dir: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> VersionInfo:
        udir = self.user_dir(user)
        src = os.fspath(src_dir)
        total = self._scan(src)
        if total > self.quota_bytes:
            raise QuotaExceeded(
                f"{user}: {src} holds {total} bytes, over the quota of {self.quota_bytes} bytes"
            )
        try:
            if not udir.is_dir():
                udir.mkdir(parents=True, exist_ok=True)
                _fsync_dir(udir.parent)
        except OSError as e:
            raise _store_error(f"save of {user}", udir, e) from e
        version = self._next_version(udir)  # before cleanup: never reuse a number that was on disk
        self._cleanup_stale(udir)
        t0 = time.monotonic()
        tmp_paths: list[Path] = []
        try:
            tmp, fd = self._mktemp(udir, "tar", tmp_paths)
            try:
                files, dirs, size, digest = self._write_archive(fd, src, total, progress)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            manifest = Manifest(
                user=user,
                version=version,
                created=_now_iso(),
                files=tuple(files),
                dirs=tuple(dirs),
                total_size=sum(f.size for f in files),
                archive_size=size,
                archive_sha256=digest,
            )
            self._commit(udir, tmp, manifest, tmp_paths)
        except OSError as e:
            self._abort(tmp_paths)
            raise _store_error(f"save of {user} version {version}", udir, e) from e
        except BaseException:
            self._abort(tmp_paths)
            raise
        log.info(
            "saved %s version %d: %d files, %d bytes in %.3fs",
            user,
            version,
            len(manifest.files),
            manifest.total_size,
            time.monotonic() - t0,
        )
        self._prune(udir)
        return manifest.info()

    def _scan(self, src: str) -> int:
        """Total bytes of regular files under ``src``; raises on anything the store refuses."""
        total = 0
        try:
            for e in _walk_source(src):
                if not e.is_dir:
                    try:
                        total += os.stat(e.name, dir_fd=e.dir_fd, follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except OSError as e:
            raise SourceError(f"cannot read source directory {src}: {e}") from e
        return total

    def _write_archive(
        self, fd: int, src: str, total: int, progress: Progress | None
    ) -> tuple[list[FileEntry], list[str], int, str]:
        chunk = self.chunk_size
        buf = bytearray(chunk)
        view = memoryview(buf)
        small = min(chunk, 256 * 1024)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-hash")
        try:
            return self._stream_archive(fd, src, total, progress, buf, view, small, pool)
        finally:
            pool.shutdown(wait=True)

    def _stream_archive(
        self,
        fd: int,
        src: str,
        total: int,
        progress: Progress | None,
        buf: bytearray,
        view: memoryview,
        small: int,
        pool: ThreadPoolExecutor,
    ) -> tuple[list[FileEntry], list[str], int, str]:
        chunk = len(buf)
        out = _ArchiveWriter(fd, chunk, pool)
        files: list[FileEntry] = []
        dirs: list[str] = []
        done = 0
        quota = self.quota_bytes
        if progress:
            progress(0, total)
        for e in _walk_source(src):
            if e.is_dir:
                st = os.fstat(e.dir_fd)
                out.write(_tar_header(e.rel, is_dir=True, size=0, mode=st.st_mode, mtime=st.st_mtime))
                dirs.append(e.rel)
                continue
            try:
                sfd = os.open(e.name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=e.dir_fd)
            except FileNotFoundError:
                log.warning("%s/%s vanished during save; not saved", src, e.rel)
                continue
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise UnsafeSource(f"{src}/{e.rel}: became a symlink during save") from err
                raise SourceError(f"cannot read {src}/{e.rel}: {err.strerror}") from err
            try:
                st = os.fstat(sfd)
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeSource(f"{src}/{e.rel}: refusing to save a {_kind(st.st_mode)}")
                size = st.st_size
                if done + size > quota:
                    raise QuotaExceeded(f"{src} grew over the quota of {quota} bytes during save")
                out.write(_tar_header(e.rel, is_dir=False, size=size, mode=st.st_mode, mtime=st.st_mtime))
                fh = hashlib.sha256()
                remaining = size
                while remaining:
                    try:
                        n = os.readv(sfd, [view[: min(remaining, chunk)]])
                    except OSError as err:
                        raise SourceError(f"cannot read {src}/{e.rel}: {err.strerror}") from err
                    if n == 0:
                        raise SourceError(f"{src}/{e.rel} shrank during save; try again")
                    v = view[:n]
                    if n >= small:
                        out.write_chunk(v, fh)
                    else:
                        fh.update(v)
                        out.write(v)
                    remaining -= n
                    done += n
                    if progress and n == chunk:
                        progress(done, max(total, done))
            finally:
                os.close(sfd)
            pad = -size % _BLOCK
            if pad:
                out.write(_ZERO_BLOCKS[:pad])
            files.append(FileEntry(e.rel, size, fh.hexdigest(), st.st_mode & 0o777))
            if progress:
                progress(done, max(total, done))
        out.write(_ZERO_BLOCKS)
        out.flush()
        if progress:
            progress(done, max(total, done))
        return files, dirs, out.size, out.hash.hexdigest()

    def _mktemp(self, udir: Path, kind: str, tmp_paths: list[Path]) -> tuple[Path, int]:
        path = udir / f".tmp.{_HOST_ID}.{os.getpid()}.{secrets.token_hex(6)}.{kind}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW, 0o600)
        tmp_paths.append(path)
        return path, fd

    def _publish(self, tmp: Path, final: Path) -> None:
        """Give ``tmp`` the name ``final``, failing (VersionExists) if ``final`` exists."""
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise VersionExists(f"{final} already exists: another writer saved concurrently") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # Filesystem without hard links: claim the name with O_EXCL, then rename over it.
            try:
                os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600))
            except FileExistsError:
                raise VersionExists(f"{final} already exists: another writer saved concurrently") from None
            os.rename(tmp, final)
            return
        os.unlink(tmp)

    def _commit(self, udir: Path, tmp_archive: Path, manifest: Manifest, tmp_paths: list[Path]) -> None:
        """Make a version visible. ``tmp_archive`` is complete (and fsynced when ``self.fsync``).

        The manifest is written and fsynced to a temp file, then the archive gets its final name,
        then the manifest (the commit point), then one directory fsync makes both names durable.
        Both names live in one directory, which journaling filesystems persist in order; and even
        a manifest whose archive name were lost would only read as a corrupt version that restore
        skips, while this save had not returned yet.
        """
        tmp_json, fd = self._mktemp(udir, "json", tmp_paths)
        try:
            _write_all(fd, manifest.to_json())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        final_archive = self._archive(udir, manifest.version)
        self._publish(tmp_archive, final_archive)
        tmp_paths.remove(tmp_archive)
        try:
            self._publish(tmp_json, self._manifest_path(udir, manifest.version))
            tmp_paths.remove(tmp_json)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(final_archive)
            raise
        # Committed. A failing directory fsync now only weakens durability; say so, do not fail.
        if self.fsync:
            try:
                _fsync_dir(udir)
            except OSError as e:
                log.warning("fsync of %s after commit failed: %s", udir, e)

    def _abort(self, tmp_paths: list[Path]) -> None:
        for p in tmp_paths:
            with contextlib.suppress(OSError):
                os.unlink(p)
        tmp_paths.clear()

    def _next_version(self, udir: Path) -> int:
        numbers = [int(mo.group(1)) for n in self._listdir(udir) if (mo := _VERSION_FILE_RE.match(n))]
        return max(numbers, default=0) + 1

    def _cleanup_stale(self, udir: Path) -> None:
        """Remove temp files of dead writers and old archives that never got a manifest."""
        now = time.time()
        names = self._listdir(udir)
        manifests = {n[:-5] for n in names if n.endswith(".json") and _VERSION_FILE_RE.match(n)}
        for name in names:
            path = udir / name
            mo = _TMP_RE.match(name)
            stale = False
            if mo:
                host, pid = mo.group(1), int(mo.group(2))
                stale = (host == _HOST_ID and not _pid_alive(pid)) or self._older_than_stale(path, now)
            else:
                vo = _VERSION_FILE_RE.match(name)
                if vo and vo.group(2) == "tar" and vo.group(1) not in manifests:
                    stale = self._older_than_stale(path, now)
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    log.info("removed leftover %s", path)

    def _older_than_stale(self, path: Path, now: float) -> bool:
        try:
            return now - path.lstat().st_mtime > self.stale_seconds
        except OSError:
            return False

    def _prune(self, udir: Path) -> None:
        names = self._listdir(udir)
        numbers = sorted(
            (int(mo.group(1)) for n in names if (mo := _VERSION_FILE_RE.match(n)) and mo.group(2) == "json"),
            reverse=True,
        )
        if len(numbers) <= self.keep:
            return
        kept = 0
        cutoff = None
        for number in numbers:  # newest first; parse only as many manifests as needed
            with contextlib.suppress(VersionNotFound):
                self._load(udir, number)
                kept += 1
                if kept == self.keep:
                    cutoff = number
                    break
        if cutoff is None:
            return
        doomed = sorted(
            (int(mo.group(1)), mo.group(2), n)
            for n in names
            if (mo := _VERSION_FILE_RE.match(n)) and int(mo.group(1)) < cutoff
        )
        # Manifests first: a version disappears for readers before its archive does.
        for _, _kind, name in sorted(doomed, key=lambda t: t[1] != "json"):
            try:
                os.unlink(udir / name)
            except OSError as e:
                log.warning("could not prune %s: %s", udir / name, e)
        if doomed:
            log.info("pruned %s versions below %d", udir.name, cutoff)

    # ---- promote --------------------------------------------------------------------------------

    def promote(self, user: str, version: int, *, progress: Progress | None = None) -> VersionInfo:
        udir = self.user_dir(user)
        src = self._load(udir, version)
        new_version = self._next_version(udir)
        tmp_paths: list[Path] = []
        try:
            self._cleanup_stale(udir)
            tmp, fd = self._mktemp(udir, "tar", tmp_paths)
            try:
                h = hashlib.sha256()
                size = 0
                buf = bytearray(self.chunk_size)
                view = memoryview(buf)
                try:
                    f = open(self._archive(udir, version), "rb", buffering=0)  # noqa: SIM115
                except FileNotFoundError:
                    raise CorruptVersion(f"{user} version {version}: archive is missing") from None
                with f:
                    while n := f.readinto(buf):
                        h.update(view[:n])
                        _write_all(fd, view[:n])
                        size += n
                        if progress:
                            progress(size, src.archive_size)
                if size != src.archive_size or h.hexdigest() != src.archive_sha256:
                    raise CorruptVersion(f"{user} version {version}: archive does not match its manifest")
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            manifest = replace(src, version=new_version, created=_now_iso(), promoted_from=version)
            self._commit(udir, tmp, manifest, tmp_paths)
        except OSError as e:
            self._abort(tmp_paths)
            raise _store_error(f"promote of {user} version {version}", udir, e) from e
        except BaseException:
            self._abort(tmp_paths)
            raise
        log.info("promoted %s version %d to version %d", user, version, new_version)
        self._prune(udir)
        return manifest.info()

    # ---- restore --------------------------------------------------------------------------------

    def restore(
        self,
        user: str,
        dest_dir: str | os.PathLike[str],
        version: int | None = None,
        *,
        progress: Progress | None = None,
    ) -> VersionInfo:
        udir = self.user_dir(user)
        dest = Path(os.path.abspath(dest_dir))
        if version is not None:
            m = self._load(udir, version)
            self._restore_one(udir, m, dest, progress)
            return m.info()
        candidates = self._manifests(udir)
        if not candidates:
            raise NoVersions(f"{user}: no saved versions")
        skipped: list[int] = []
        for m in reversed(candidates):
            try:
                self._restore_one(udir, m, dest, progress)
            except CorruptVersion as e:
                log.error("%s version %d is corrupt, trying the one before: %s", user, m.version, e)
                skipped.append(m.version)
                continue
            if skipped:
                log.warning("%s: restored version %d instead of corrupt %s", user, m.version, skipped)
            return replace(m.info(), fell_back_from=skipped[0] if skipped else None, skipped=tuple(skipped))
        raise NoGoodVersion(f"{user}: every saved version is corrupt: {skipped}")

    def _restore_one(self, udir: Path, m: Manifest, dest: Path, progress: Progress | None) -> None:
        t0 = time.monotonic()
        parent = dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._cleanup_restore_leftovers(dest)
            tmp = parent / f".{dest.name}.restore.{_HOST_ID}.{os.getpid()}.{secrets.token_hex(6)}"
            os.mkdir(tmp, 0o700)
        except OSError as e:
            raise StoreError(f"cannot restore into {dest}: {e.strerror or e}") from e
        try:
            try:
                self._extract(udir, m, tmp, progress)
                self._swap(tmp, dest)
            except OSError as e:
                raise StoreError(f"cannot restore {m.user} version {m.version} into {dest}: {e}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "restored %s version %d into %s: %d files, %d bytes in %.3fs",
            m.user,
            m.version,
            dest,
            len(m.files),
            m.total_size,
            time.monotonic() - t0,
        )

    def _cleanup_restore_leftovers(self, dest: Path) -> None:
        prefix = f".{dest.name}."
        now = time.time()
        for name in self._listdir(dest.parent):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split(".")
            if len(parts) != 4 or parts[0] not in ("restore", "old"):
                continue
            host, pid = parts[1], parts[2]
            path = dest.parent / name
            dead = host == _HOST_ID and pid.isdigit() and not _pid_alive(int(pid))
            if dead or self._older_than_stale(path, now):
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed leftover %s", path)

    def _swap(self, tmp: Path, dest: Path) -> None:
        if not os.path.lexists(dest):
            os.chmod(tmp, 0o755)
            os.rename(tmp, dest)
            return
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(dest).st_mode))
        except OSError:
            os.chmod(tmp, 0o755)
        old = dest.parent / f".{dest.name}.old.{_HOST_ID}.{os.getpid()}.{secrets.token_hex(6)}"
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old, dest)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()

    def _extract(self, udir: Path, m: Manifest, tmp: Path, progress: Progress | None) -> None:
        """Extract version ``m`` into the empty directory ``tmp``, verifying everything."""
        where = f"{m.user} version {m.version}"
        expected = {f.path: f for f in m.files}
        expected_dirs = set(m.dirs)
        seen: set[str] = set()
        dir_meta: list[tuple[str, int, int]] = []
        chunk = self.chunk_size
        buf = bytearray(chunk)
        view = memoryview(buf)
        total = m.total_size
        done = 0
        base = os.fspath(tmp)
        if progress:
            progress(0, total)
        try:
            raw = open(self._archive(udir, m.version), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            raise CorruptVersion(f"{where}: archive is missing") from None
        except OSError as e:
            raise CorruptVersion(f"{where}: cannot open archive: {e}") from e
        umask = _current_umask() | 0o111  # exec bits always need fchmod (created without them)
        small = min(chunk, 256 * 1024)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-hash")
        with raw, contextlib.ExitStack() as stack:
            stack.callback(pool.shutdown, wait=True)
            afd = raw.fileno()
            for ti in _iter_tar(afd, where):
                name = ti.name.rstrip("/") if ti.type == tarfile.DIRTYPE else ti.name
                try:
                    rel = _check_rel(name)
                except ValueError:
                    raise UnsafeArchive(f"{where}: refusing member {ti.name!r}: unsafe path") from None
                if ti.type == tarfile.DIRTYPE:
                    if rel not in expected_dirs or rel in seen:
                        raise CorruptVersion(f"{where}: directory {rel!r} is not in the manifest")
                    seen.add(rel)
                    os.makedirs(os.path.join(base, rel), 0o700, exist_ok=True)
                    dir_meta.append((rel, ti.mode & 0o777, int(ti.mtime)))
                    continue
                if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise UnsafeArchive(f"{where}: refusing member {ti.name!r}: {_member_kind(ti)}")
                entry = expected.get(rel)
                if entry is None or rel in seen:
                    raise CorruptVersion(f"{where}: file {rel!r} is not in the manifest (or repeated)")
                if ti.size != entry.size:
                    raise CorruptVersion(f"{where}: {rel!r} has size {ti.size}, manifest says {entry.size}")
                seen.add(rel)
                target = os.path.join(base, rel)
                parent_rel = rel.rpartition("/")[0]
                if parent_rel and parent_rel not in seen:
                    os.makedirs(os.path.join(base, parent_rel), 0o700, exist_ok=True)
                try:
                    out = os.open(
                        target,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                        entry.mode & 0o666,
                    )
                except (FileExistsError, NotADirectoryError) as e:
                    raise CorruptVersion(f"{where}: {rel!r} clashes with another member") from e
                try:
                    h = hashlib.sha256()
                    off = ti.offset_data
                    remaining = ti.size
                    while remaining:
                        k = min(remaining, chunk)
                        try:
                            n = os.preadv(afd, [view[:k]], off)
                        except OSError as e:
                            raise CorruptVersion(f"{where}: cannot read archive: {e}") from e
                        if n <= 0:
                            raise CorruptVersion(f"{where}: archive is truncated in {rel!r}")
                        v = view[:n]
                        if n >= small:  # hash on the helper thread while this one writes
                            fut = pool.submit(h.update, v)
                            try:
                                _write_all(out, v)
                            finally:
                                fut.result()
                        else:
                            h.update(v)
                            _write_all(out, v)
                        off += n
                        remaining -= n
                        done += n
                        if progress and n == chunk:
                            progress(done, total)
                    if h.hexdigest() != entry.sha256:
                        raise CorruptVersion(f"{where}: checksum mismatch in {rel!r}")
                    if entry.mode & umask:  # created 0o666 & ~umask: fix only when that differs
                        os.fchmod(out, entry.mode)
                    os.utime(out, (ti.mtime, ti.mtime))
                    if self.fsync_restore:
                        os.fsync(out)
                finally:
                    os.close(out)
                if progress:
                    progress(done, total)
        missing = (set(expected) | expected_dirs) - seen
        if missing:
            raise CorruptVersion(f"{where}: archive lacks {len(missing)} entries, e.g. {sorted(missing)[:3]}")
        for rel, mode, mtime in sorted(dir_meta, key=lambda t: t[0].count("/"), reverse=True):
            path = os.path.join(base, rel)
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))
        if self.fsync_restore:
            for rel in [*m.dirs, ""]:
                _fsync_dir(os.path.join(base, rel))


def _current_umask() -> int:
    """The process umask without changing it (Linux /proc); assume the strictest if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777


_MEMBER_KINDS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


def _member_kind(ti: _Member) -> str:
    return _MEMBER_KINDS.get(ti.type, f"unsupported member type {ti.type!r}")


@dataclass(slots=True)
class _Member:
    name: str
    type: bytes
    size: int
    mode: int
    mtime: int
    offset_data: int


def _tar_number(field: bytes, what: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256, positive
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptVersion(f"{what}: bad numeric field {field!r}") from None


def _read_exact(afd: int, size: int, off: int, what: str) -> bytes:
    try:
        data = os.pread(afd, size, off)
    except OSError as e:
        raise CorruptVersion(f"{what}: cannot read archive: {e}") from e
    if len(data) != size:
        raise CorruptVersion(f"{what}: archive is truncated")
    return data


def _parse_pax(data: bytes, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    try:
        while pos < len(data) and data[pos] != 0:
            sp = data.index(b" ", pos)
            length = int(data[pos:sp])
            if length <= 0 or pos + length > len(data) or data[pos + length - 1] != 0x0A:
                raise ValueError("bad record length")
            key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
            out[key.decode("utf-8")] = value.decode("utf-8")
            pos += length
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptVersion(f"{what}: bad pax header: {e}") from None
    return out


def _iter_tar(afd: int, what: str) -> Iterator[_Member]:
    """Members of an uncompressed ustar/pax/GNU tar, verifying every header checksum.

    Much cheaper than ``tarfile`` (which costs ~15 us per member); understands pax extended
    headers (``path``, ``size``, ``mtime``) and GNU long names, and reports every other member type
    as is for the caller to refuse. Corruption of any header raises ``CorruptVersion`` (tarfile would
    silently treat a bad header after the first as the end of the archive).
    """
    off = 0
    pax: dict[str, str] = {}
    longname: bytes | None = None
    while True:
        hdr = _read_exact(afd, _BLOCK, off, what)
        if hdr == _ZERO_BLOCKS[:_BLOCK]:
            if pax or longname is not None:
                raise CorruptVersion(f"{what}: extended header without a member")
            return
        stored = _tar_number(hdr[148:156], what)
        unsigned = sum(hdr) - sum(hdr[148:156]) + 256
        if stored != unsigned and stored != unsigned - 2 * sum(b for b in hdr if b > 127):  # signed sum
            raise CorruptVersion(f"{what}: bad tar header checksum at offset {off}")
        kind = hdr[156:157]
        size = _tar_number(hdr[124:136], what)
        data_off = off + _BLOCK
        off = data_off + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
            if size > 1 << 20:
                raise CorruptVersion(f"{what}: oversized extended header")
            data = _read_exact(afd, size, data_off, what)
            if kind == tarfile.XHDTYPE:
                pax.update(_parse_pax(data, what))
            else:
                longname = data.split(b"\0", 1)[0]
            continue
        raw_name = hdr[0:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix and hdr[257:263] == tarfile.POSIX_MAGIC[:6]:
                raw_name = prefix + b"/" + raw_name
        if longname is not None:
            raw_name, longname = longname, None
        try:
            name = pax.pop("path") if "path" in pax else raw_name.decode("utf-8")
            if "size" in pax:
                size = int(pax.pop("size"))
                off = data_off + (size + _BLOCK - 1) // _BLOCK * _BLOCK
            mtime = int(float(pax.pop("mtime"))) if "mtime" in pax else _tar_number(hdr[136:148], what)
        except (UnicodeDecodeError, ValueError) as e:
            raise CorruptVersion(f"{what}: bad member header at offset {data_off - _BLOCK}: {e}") from None
        pax.clear()
        if kind == tarfile.AREGTYPE and name.endswith("/"):
            kind = tarfile.DIRTYPE  # pre-POSIX directory
        yield _Member(name, kind, size, _tar_number(hdr[100:108], what), mtime, data_off)
