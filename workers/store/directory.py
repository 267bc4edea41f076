"""The :class:`DirectoryStore`: versions of each user's data as tar + manifest in a directory
(local or shared between hosts). The package docstring has the layout and the commit point."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .manifest import (
    _BLOCK,
    _HOST_ID,
    _O_CLOEXEC,
    _O_NOFOLLOW,
    _O_NONBLOCK,
    _TMP_RE,
    _VERSION_FILE_RE,
    _ZERO_BLOCKS,
    CHUNK_SIZE,
    DEFAULT_KEEP,
    DEFAULT_QUOTA_BYTES,
    DEFAULT_STALE_SECONDS,
    CorruptVersion,
    FileEntry,
    Manifest,
    NoGoodVersion,
    NoVersions,
    QuotaExceeded,
    SourceError,
    Store,
    StoreError,
    UnsafeSource,
    VersionExists,
    VersionInfo,
    VersionNotFound,
    _check_user,
)
from .tarread import ArchiveHasher, extract_verified
from .tarwrite import (
    HASH_TIMEOUT,
    _ArchiveWriter,
    _fsync_dir,
    _kind,
    _now_iso,
    _pid_alive,
    _store_error,
    _tar_header,
    _walk_source,
    _write_all,
)

log = logging.getLogger(__name__)

HASH_PROCESS_BYTES = 8 * 1024 * 1024
"""A save of at least this many bytes hashes in a forked process rather than on a thread (see
``tarwrite._ProcessHasher``); below, the fork costs more than it saves (break-even near 4 MiB
here). 0 = never."""

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; called with non-decreasing ``done_bytes`` per attempt."""

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
        hash_process_bytes: int = HASH_PROCESS_BYTES,
        hash_timeout: float = HASH_TIMEOUT,
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
        self.hash_process_bytes = hash_process_bytes
        self.hash_timeout = hash_timeout

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
        where = f"{user} version {version}"
        try:
            with open(path, "rb", buffering=0) as f:
                ok = self._matches(f, m, where)
        except OSError as e:
            log.warning("%s: cannot read archive %s: %s", where, path, e)
            return False
        except CorruptVersion as e:
            log.warning("%s: archive %s is corrupt: %s", where, path, e)
            return False
        if not ok:
            log.warning("%s: archive %s does not match its manifest", where, path)
        return ok

    def _matches(
        self, f: io.FileIO, m: Manifest, where: str, each: Callable[[memoryview, int], None] | None = None
    ) -> bool:
        """Whether the archive ``f`` (read to its end, each piece handed to ``each`` with the bytes
        read so far) has ``m``'s size and digest."""
        h = ArchiveHasher(f.fileno(), m, where)
        buf = bytearray(self.chunk_size)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            if each is not None:
                each(view[:n], h.size)
        return h.size == m.archive_size and h.hexdigest() == m.archive_sha256

    # ---- unchanged? ------------------------------------------------------------------------------

    def matches_newest(self, user: str, src_dir: str | os.PathLike[str], slack: float = 2.0) -> int | None:
        """The newest version's number if ``src_dir`` holds exactly what it holds, else None.

        Cheap first: the same directories and files with the same sizes and modes; then only files
        modified after that version's save began reading (``slack`` s before, for coarse clocks;
        versions older than that record have only their creation time) are hashed and compared. So
        a file rewritten while that save ran is hashed, and a file whose mtime alone changed (a
        ``touch``, a program rewriting the same bytes) is taken as unchanged: its content is what
        the version holds (restoring it gives the version's mtime back). A file rewritten with the
        same size and its old mtime put back is taken as unchanged too: whoever does that only keeps
        their own edit out of their own saved data.
        """
        manifests = self._manifests(self.user_dir(user))
        if not manifests:
            return None
        m = manifests[-1]
        made = _dt.datetime.fromisoformat((m.started or m.created).replace("Z", "+00:00")).timestamp()
        want = {f.path: f for f in m.files}
        dirs: set[str] = set()
        seen = 0
        try:
            for e in _walk_source(os.fspath(src_dir)):
                if e.is_dir:
                    dirs.add(e.rel)
                    continue
                f = want.get(e.rel)
                st = os.stat(e.name, dir_fd=e.dir_fd, follow_symlinks=False)
                if f is None or st.st_size != f.size or stat.S_IMODE(st.st_mode) != f.mode:
                    return None
                if st.st_mtime > made - slack and self._hash_at(e.dir_fd, e.name) != f.sha256:
                    return None
                seen += 1
        except (OSError, StoreError):
            return None  # unreadable or unsafe now: a real save says what is wrong
        return m.version if seen == len(want) and dirs == set(m.dirs) else None

    def _hash_at(self, dir_fd: int, name: str) -> str:
        h = hashlib.sha256()
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
        try:
            while chunk := os.read(fd, self.chunk_size):
                h.update(chunk)
        finally:
            os.close(fd)
        return h.hexdigest()

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
        started = _now_iso()  # a file changed after this may differ from what the archive holds
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
                started=started,
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
        process = 0 < self.hash_process_bytes <= total
        try:
            out = _ArchiveWriter(fd, self.chunk_size, process=process, timeout=self.hash_timeout)
        except OSError as e:  # no fork (memory, a process limit): hash on a thread
            log.warning("cannot fork a hashing process (%s); hashing on a thread", e)
            out = _ArchiveWriter(fd, self.chunk_size, process=False)
        try:
            return self._stream_archive(out, src, total, progress)
        finally:
            out.close()

    def _stream_archive(
        self, out: _ArchiveWriter, src: str, total: int, progress: Progress | None
    ) -> tuple[list[FileEntry], list[str], int, str]:
        """One pass: every file is read straight into the archive writer's buffer, which the
        helper hashes (each file's sha256, the archive's member digest) while this thread reads the
        next files and writes the previous buffer."""
        files: list[tuple[str, int, int]] = []  # path, size, mode: the sha256s come from the helper
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
                out.begin_file()
                remaining = size
                while remaining:
                    space = out.space()
                    try:
                        n = os.readv(sfd, [space[:remaining]])
                    except OSError as err:
                        raise SourceError(f"cannot read {src}/{e.rel}: {err.strerror}") from err
                    if n == 0:
                        raise SourceError(f"{src}/{e.rel} shrank during save; try again")
                    out.commit(n)
                    remaining -= n
                    done += n
                    if progress and remaining:
                        progress(done, max(total, done))
                out.end_file()
            finally:
                os.close(sfd)
            pad = -size % _BLOCK
            if pad:
                out.write(_ZERO_BLOCKS[:pad])
            files.append((e.rel, size, st.st_mode & 0o777))
            if progress:
                progress(done, max(total, done))
        out.write(_ZERO_BLOCKS)
        out.flush()
        if progress:
            progress(done, max(total, done))
        entries = [FileEntry(p, n, h, mode) for (p, n, mode), h in zip(files, out.file_digests, strict=True)]
        return entries, dirs, out.size, out.digest

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
        for _, _k, name in sorted(doomed, key=lambda t: t[1] != "json"):
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
                try:
                    f = open(self._archive(udir, version), "rb", buffering=0)  # noqa: SIM115
                except FileNotFoundError:
                    raise CorruptVersion(f"{user} version {version}: archive is missing") from None

                def copy(piece: memoryview, done: int) -> None:
                    _write_all(fd, piece)
                    if progress:
                        progress(done, src.archive_size)

                with f:
                    ok = self._matches(f, src, f"{user} version {version}", copy)
                if not ok:
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
                extract_verified(
                    self._archive(udir, m.version), m, tmp, progress, self.chunk_size, self.fsync_restore
                )
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
