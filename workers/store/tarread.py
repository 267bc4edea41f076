"""Reading an archive back: a strict tar parser (regular files and directories only, every header
checked) and :func:`extract_verified`, which checks every member against the manifest (path,
size, sha256) while extracting into an empty directory."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .manifest import (
    _BLOCK,
    _O_CLOEXEC,
    _O_NOFOLLOW,
    _ZERO_BLOCKS,
    CorruptVersion,
    Manifest,
    MemberDigest,
    UnsafeArchive,
    _check_rel,
)
from .tarwrite import _fsync_dir, _write_all

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; called with non-decreasing ``done_bytes`` per attempt."""


def extract_verified(
    archive: Path, m: Manifest, tmp: Path, progress: Progress | None, chunk: int, fsync: bool
) -> None:
    """Extract version ``m`` into the empty directory ``tmp``, verifying everything."""
    where = f"{m.user} version {m.version}"
    expected = {f.path: f for f in m.files}
    expected_dirs = set(m.dirs)
    seen: set[str] = set()
    dir_meta: list[tuple[str, int, int]] = []
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = m.total_size
    done = 0
    base = os.fspath(tmp)
    if progress:
        progress(0, total)
    try:
        raw = open(archive, "rb", buffering=0)  # noqa: SIM115
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
                if fsync:
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
    if fsync:
        for rel in [*m.dirs, ""]:
            _fsync_dir(os.path.join(base, rel))


class ArchiveHasher:
    """The digest a manifest records for its archive, computed from the archive's bytes fed in
    order with :meth:`update`: a plain sha256 for format 1, the :class:`MemberDigest` for format 2
    (its member boundaries read first from the archive's headers, so a corrupt header raises
    :class:`CorruptVersion` here)."""

    def __init__(self, afd: int, m: Manifest, what: str) -> None:
        self.size = 0
        self._plain = hashlib.sha256() if m.format == 1 else None
        self._digest = MemberDigest()
        # (start, end) of every regular member's data, in order
        self._regions = [
            (ti.offset_data, ti.offset_data + ti.size)
            for ti in (() if self._plain else _iter_tar(afd, what))
            if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE)
        ]
        self._next = 0  # index of the first region not yet finished
        self._in_file = False

    def update(self, view: memoryview) -> None:
        if self._plain is not None:
            self._plain.update(view)
            self.size += len(view)
            return
        d = self._digest
        regions = self._regions
        pos = self.size
        i, n = 0, len(view)
        while i < n or (self._next < len(regions) and regions[self._next][0] == pos and not self._in_file):
            if self._in_file:
                end = regions[self._next][1]
                k = min(n - i, end - pos)
                d.data(view[i : i + k])
                i += k
                pos += k
                if pos == end:
                    d.end_file()
                    self._in_file = False
                    self._next += 1
                continue
            start = regions[self._next][0] if self._next < len(regions) else None
            if start == pos:
                d.begin_file()
                self._in_file = True
                if regions[self._next][1] == pos:  # an empty file
                    d.end_file()
                    self._in_file = False
                    self._next += 1
                continue
            k = n - i if start is None else min(n - i, start - pos)
            d.meta(view[i : i + k])
            i += k
            pos += k
        self.size = pos

    def hexdigest(self) -> str | None:
        """The digest, or None if the archive ended inside or before a member's data."""
        if self._plain is not None:
            return self._plain.hexdigest()
        if self._in_file or self._next < len(self._regions):
            return None
        return self._digest.hexdigest()


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
