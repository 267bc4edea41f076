"""The store's contract: errors, the manifest schema (every file's path, size, sha256, mode) and
the ``Store`` protocol that the data-management jobs program against. See the package docstring
for the layout and crash-safety rules."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; called with non-decreasing ``done_bytes`` per attempt."""

MANIFEST_FORMAT = 2
"""Format 2: ``archive_sha256`` is the archive's *member digest* (:class:`MemberDigest`); format 1
(still read) held the sha256 of the archive file itself."""
FORMATS = (1, 2)
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
# The archive's digest


class MemberDigest:
    """sha256 of an archive in which every regular file member's data is replaced by the 32-byte
    sha256 of that data: headers, padding and end blocks are hashed as they are.

    It commits to every byte of the archive as a plain sha256 of the file would, but a save hashes
    each file's data once (its sha256 is the manifest's per-file checksum and the archive digest's
    input), where a plain archive sha256 hashed all the data a second time. Feed it the archive in
    order: :meth:`meta` for bytes outside file data, :meth:`begin_file`, :meth:`data` (as often as needed) and
    :meth:`end_file` around each regular member's data (an empty file too).
    """

    __slots__ = ("_file", "_new", "_tree")

    def __init__(self, new: Callable[[], Any] = hashlib.sha256) -> None:
        self._new = new
        self._tree = new()
        self._file: Any = None

    def meta(self, data: bytes | memoryview) -> None:
        self._tree.update(data)

    def begin_file(self) -> None:
        self._file = self._new()

    def data(self, data: bytes | memoryview) -> None:
        self._file.update(data)

    def end_file(self) -> str:
        """The file's sha256 (hex); it goes into the archive digest."""
        digest = self._file.digest()
        self._file = None
        self._tree.update(digest)
        return digest.hex()

    def hexdigest(self) -> str:
        return self._tree.hexdigest()


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
    started: str | None = None  # when the save began reading the source (ISO 8601, UTC)

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
            **({"started": self.started} if self.started else {}),
            "dirs": list(self.dirs),
            "files": [[f.path, f.size, f.sha256, f.mode] for f in self.files],
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate a manifest; ``ValueError`` if it is incomplete or inconsistent."""
        try:
            doc = json.loads(data.decode("utf-8"))
            if (
                not isinstance(doc, dict)
                or type(doc.get("format")) is not int
                or doc["format"] not in FORMATS
            ):
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
                started=None if doc.get("started") is None else str(doc["started"]),
                format=doc["format"],
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
