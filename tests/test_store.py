"""DirectoryStore on the real filesystem: round trips, versions, corruption, crashes, hostile input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import missing_prerequisite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudq.workers.store import (
    CorruptVersion,
    DirectoryStore,
    InvalidUserName,
    Manifest,
    NoGoodVersion,
    NoVersions,
    QuotaExceeded,
    Store,
    StoreError,
    UnsafeArchive,
    UnsafeSource,
    VersionNotFound,
)

USER = "alice"


# ------------------------------------------------------------ helpers


def make_tree(root: Path, seed: int = 0, *, big: int = 300_000) -> dict[str, bytes]:
    """Nested dirs, binary files (all 256 byte values), an empty file and an empty dir."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    files = {
        "top.bin": bytes(range(256)) * 3 + rnd,
        "empty.dat": b"",
        "a/b/c/deep.bin": os.urandom(5000),
        "a/b/sibling.txt": f"seed {seed}\n".encode(),
        "a/big.bin": os.urandom(big),
        "name with spaces/ünïcode-é.bin": b"\x00\xff" * 700,
        "x" * 120 + "/long-" + "y" * 100: b"long path",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "empty-dir" / "nested-empty").mkdir(parents=True)
    os.chmod(root / "a/b/sibling.txt", 0o640)
    os.chmod(root / "top.bin", 0o755)
    return files


def snapshot(root: Path) -> dict[str, tuple[str, bytes | None, int]]:
    """Everything under root: kind, content, permission bits."""
    out: dict[str, tuple[str, bytes | None, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", None, stat.S_IMODE(st_.st_mode))
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st_.st_mode))
            else:
                out[rel] = ("other", None, st_.st_mode)
    return out


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def flip_byte_in_member_data(archive: Path, member: str, delta: int = 7) -> None:
    with tarfile.open(archive) as tf:
        off = tf.getmember(member).offset_data
    with open(archive, "r+b") as f:
        f.seek(off + delta)
        b = f.read(1)
        f.seek(off + delta)
        f.write(bytes([b[0] ^ 0xFF]))


def temp_files(udir: Path) -> list[str]:
    return sorted(n for n in os.listdir(udir) if n.startswith(".tmp.")) if udir.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "store")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    make_tree(d)
    return d


# ------------------------------------------------------------ basics


def test_directory_store_satisfies_protocol(store: DirectoryStore) -> None:
    assert isinstance(store, Store)


def test_round_trip_nested_binary(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    info = store.save(USER, src)
    assert info.version == 1
    assert info.file_count == 7
    assert info.total_size == sum(len(v) for v in make_tree(tmp_path / "again").values())
    dest = tmp_path / "ws" / "alice"
    got = store.restore(USER, dest)
    assert got.version == 1 and got.fell_back_from is None and got.skipped == ()
    assert snapshot(dest) == snapshot(src)
    # mtimes survive (whole seconds)
    assert int((dest / "a/big.bin").stat().st_mtime) == int((src / "a/big.bin").stat().st_mtime)
    # manifest lists every file with size and sha256
    m = store.show(USER)
    entry = {f.path: f for f in m.files}["a/big.bin"]
    assert entry.size == (src / "a/big.bin").stat().st_size
    assert entry.sha256 == hashlib.sha256((src / "a/big.bin").read_bytes()).hexdigest()
    assert "empty-dir/nested-empty" in m.dirs
    assert store.verify(USER, 1)


def test_archive_is_plain_tar_readable_by_gnu_tar(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        missing_prerequisite("GNU tar not installed")
    store.save(USER, src)
    out = tmp_path / "gnu"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(store.user_dir(USER) / "00000001.tar"), "-C", str(out)], check=True)
    assert snapshot(out) == snapshot(src)


def test_restore_replaces_existing_dest(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    store.save(USER, src)
    dest = tmp_path / "ws"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    store.restore(USER, dest)
    assert snapshot(dest) == snapshot(src)
    assert sorted(os.listdir(tmp_path)) == ["src", "store", "ws"]  # no temp dirs left behind


def test_new_user_has_no_versions(store: DirectoryStore, tmp_path: Path) -> None:
    assert store.versions("bob") == []
    with pytest.raises(NoVersions):
        store.restore("bob", tmp_path / "ws")
    with pytest.raises(NoGoodVersion):  # NoVersions is a NoGoodVersion ...
        store.restore("bob", tmp_path / "ws")
    with pytest.raises(VersionNotFound):  # ... and a VersionNotFound
        store.show("bob")
    assert not (tmp_path / "ws").exists()


def test_versions_increase_and_keep_k_prunes(tmp_path: Path, src: Path) -> None:
    store = DirectoryStore(tmp_path / "store", keep=3)
    for i in range(1, 6):
        (src / "counter").write_text(str(i))
        assert store.save(USER, src).version == i
    assert [v.version for v in store.versions(USER)] == [3, 4, 5]
    names = sorted(os.listdir(store.user_dir(USER)))
    assert names == [f"{v:08d}.{ext}" for v in (3, 4, 5) for ext in ("json", "tar")]
    for v in (1, 2):
        with pytest.raises(VersionNotFound):
            store.restore(USER, tmp_path / "ws", v)
    store.restore(USER, tmp_path / "ws", 4)
    assert (tmp_path / "ws" / "counter").read_text() == "4"
    assert [v.created for v in store.versions(USER)] == sorted(v.created for v in store.versions(USER))


def test_show_and_versions_agree(store: DirectoryStore, src: Path) -> None:
    store.save(USER, src)
    (src / "more.bin").write_bytes(b"m" * 1000)
    store.save(USER, src)
    infos = store.versions(USER)
    assert [i.version for i in infos] == [1, 2]
    assert store.show(USER).version == 2
    assert store.show(USER, 1).info() == infos[0]
    assert infos[1].total_size == infos[0].total_size + 1000
    assert infos[1].file_count == infos[0].file_count + 1


# ------------------------------------------------------------ corruption


def test_corrupt_newest_falls_back_and_says_so(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    store.save(USER, src)
    first = snapshot(src)
    (src / "a/big.bin").write_bytes(os.urandom(200_000))
    store.save(USER, src)
    flip_byte_in_member_data(store.user_dir(USER) / "00000002.tar", "a/big.bin", 12345)
    assert store.verify(USER, 1)
    assert not store.verify(USER, 2)
    dest = tmp_path / "ws"
    info = store.restore(USER, dest)
    assert info.version == 1
    assert info.fell_back_from == 2
    assert info.skipped == (2,)
    assert snapshot(dest) == first
    with pytest.raises(CorruptVersion):  # asking for that version explicitly does not fall back
        store.restore(USER, tmp_path / "ws2", 2)
    assert not (tmp_path / "ws2").exists()


def test_every_version_corrupt_raises_and_leaves_dest_alone(
    store: DirectoryStore, src: Path, tmp_path: Path
) -> None:
    store.save(USER, src)
    store.save(USER, src)
    for v in (1, 2):
        flip_byte_in_member_data(store.user_dir(USER) / f"{v:08d}.tar", "top.bin", 3)
    dest = tmp_path / "ws"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    before = snapshot(dest)
    with pytest.raises(NoGoodVersion) as ei:
        store.restore(USER, dest)
    assert not isinstance(ei.value, NoVersions)
    assert snapshot(dest) == before
    assert sorted(os.listdir(tmp_path)) == ["src", "store", "ws"]


def test_truncated_archive_is_corrupt(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    store.save(USER, src)
    store.save(USER, src)
    archive = store.user_dir(USER) / "00000002.tar"
    with open(archive, "r+b") as f:
        f.truncate(archive.stat().st_size // 2)
    info = store.restore(USER, tmp_path / "ws")
    assert (info.version, info.fell_back_from) == (1, 2)


def test_missing_archive_is_corrupt(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    store.save(USER, src)
    store.save(USER, src)
    (store.user_dir(USER) / "00000002.tar").unlink()
    assert not store.verify(USER, 2)
    info = store.restore(USER, tmp_path / "ws")
    assert (info.version, info.fell_back_from) == (1, 2)


def test_truncated_manifest_makes_version_invisible(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    store.save(USER, src)
    store.save(USER, src)
    manifest = store.user_dir(USER) / "00000002.json"
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) // 2])
    assert [v.version for v in store.versions(USER)] == [1]
    assert store.show(USER).version == 1
    with pytest.raises(VersionNotFound):
        store.show(USER, 2)
    with pytest.raises(VersionNotFound):
        store.verify(USER, 2)
    info = store.restore(USER, tmp_path / "ws")
    assert info.version == 1 and info.fell_back_from is None
    # the half-written number is never reused
    assert store.save(USER, src).version == 3


def test_manifest_round_trips_json(store: DirectoryStore, src: Path) -> None:
    store.save(USER, src)
    m = store.show(USER)
    assert Manifest.from_json(m.to_json()) == m
    doc = json.loads(m.to_json())
    doc["files"][0][0] = "../escape"
    with pytest.raises(ValueError):
        Manifest.from_json(json.dumps(doc).encode())


# ------------------------------------------------------------ crashes


def test_crash_leftovers_are_ignored_and_cleaned(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    store.save(USER, src)
    udir = store.user_dir(USER)
    # a writer that died: a temp file named after a dead pid on this host, and a partial archive
    # published under the next number but never committed by a manifest
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from cloudq.workers.store import manifest as store_mod

    leftover = udir / f".tmp.{store_mod._HOST_ID}.{dead.pid}.abcdef.tar"
    leftover.write_bytes(b"partial" * 1000)
    old_other_host = udir / ".tmp.0123456789ab.1.feed.tar"
    old_other_host.write_bytes(b"x")
    partial = udir / "00000002.tar"
    partial.write_bytes((udir / "00000001.tar").read_bytes()[:3000])
    an_hour_ago = time.time() - 7200
    os.utime(partial, (an_hour_ago, an_hour_ago))
    os.utime(old_other_host, (an_hour_ago, an_hour_ago))

    assert [v.version for v in store.versions(USER)] == [1]
    assert store.verify(USER, 1)
    store.restore(USER, tmp_path / "ws")
    assert snapshot(tmp_path / "ws") == snapshot(src)

    (src / "new.txt").write_text("after the crash")
    info = store.save(USER, src)
    assert info.version == 3  # 2 is taken by the orphan archive; never overwritten
    assert temp_files(udir) == []
    assert not partial.exists()
    assert [v.version for v in store.versions(USER)] == [1, 3]
    assert store.verify(USER, 3)


def test_fresh_temp_files_of_live_writers_are_kept(store: DirectoryStore, src: Path) -> None:
    store.save(USER, src)
    udir = store.user_dir(USER)
    from cloudq.workers.store import manifest as store_mod

    live = udir / f".tmp.{store_mod._HOST_ID}.{os.getpid()}.beef.tar"  # this process is alive
    live.write_bytes(b"in flight")
    store.save(USER, src)
    assert live.exists()


CHILD_SAVE = textwrap.dedent(
    """
    import sys, time
    from cloudq.workers.store import DirectoryStore

    root, src, mode = sys.argv[1:4]
    said = False

    def progress(done, total):
        global said
        if done >= 4 * 1024 * 1024 and not said:
            said = True
            sys.stdout.write("writing\\n")
            sys.stdout.flush()
            if mode == "pause":
                time.sleep(60)

    DirectoryStore(root, quota_bytes=1 << 30).save("alice", src, progress=progress)
    sys.stdout.write("done\\n")
    sys.stdout.flush()
    """
)


@pytest.mark.parametrize("mode", ["pause", "running"])
def test_sigkill_mid_save_keeps_old_version(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "store"
    store = DirectoryStore(root, quota_bytes=1 << 30)
    src = tmp_path / "src"
    src.mkdir()
    (src / "v.txt").write_text("version one")
    store.save(USER, src)
    old = snapshot(src)
    # a large new state
    (src / "v.txt").write_text("version two")
    for i in range(8):
        (src / f"big{i}.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    for i in range(300):
        (src / "small" / str(i % 10)).mkdir(parents=True, exist_ok=True)
        (src / "small" / str(i % 10) / f"{i}.dat").write_bytes(os.urandom(3000))

    child = subprocess.Popen(
        [sys.executable, "-P", "-c", CHILD_SAVE, str(root), str(src), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "writing\n"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        if child.stdout:
            child.stdout.close()
    udir = store.user_dir(USER)
    visible = [v.version for v in store.versions(USER)]
    # the kill landed mid-save, paused or running: the child died of it with its temp archive
    # still there (a finished save renames it to a version), and no second version is visible
    assert child.returncode == -signal.SIGKILL
    assert [n for n in temp_files(udir) if n.endswith(".tar")], "the save had not begun or had finished"
    assert visible == [1]
    for v in visible:
        assert store.verify(USER, v)
    ws = tmp_path / "ws"
    store.restore(USER, ws, 1)
    assert snapshot(ws) == old
    newest = store.restore(USER, ws)
    assert newest.version == visible[-1] and newest.fell_back_from is None

    # the next save works and sweeps the dead writer's temp file
    (src / "v.txt").write_text("version three")
    info = store.save(USER, src)
    assert info.version > visible[-1]
    assert store.verify(USER, info.version)
    assert temp_files(udir) == []
    store.restore(USER, ws)
    assert (ws / "v.txt").read_text() == "version three"


# ------------------------------------------------------------ hostile archives


def _member(name: str, kind: bytes, data: bytes = b"", linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.linkname = linkname
    ti.mode = 0o644
    if kind == tarfile.CHRTYPE:
        ti.devmajor, ti.devminor = 1, 3  # /dev/null
    return ti, data


def plant_version(
    store: DirectoryStore, members: list[tuple[tarfile.TarInfo, bytes]], version: int = 1
) -> None:
    """Write a hand-built archive as a version, with a manifest that is itself well formed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    udir = store.user_dir(USER)
    udir.mkdir(parents=True, exist_ok=True)
    (udir / f"{version:08d}.tar").write_bytes(raw)
    manifest = {
        "format": 1,
        "user": USER,
        "version": version,
        "created": "2024-01-01T00:00:00.000Z",
        "promoted_from": None,
        "total_size": 4,
        "archive_size": len(raw),
        "archive_sha256": hashlib.sha256(raw).hexdigest(),
        "dirs": [],
        "files": [["evil", 4, hashlib.sha256(b"evil").hexdigest(), 0o644]],
    }
    (udir / f"{version:08d}.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "case",
    ["dotdot", "nested-dotdot", "absolute", "symlink", "symlink-then-write", "hardlink", "chardev", "fifo"],
)
def test_malicious_archive_refused(tmp_path: Path, case: str) -> None:
    store = DirectoryStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "evil"
    members = {
        "dotdot": [_member("../outside/evil", tarfile.REGTYPE, b"evil")],
        "nested-dotdot": [_member("a/../../outside/evil", tarfile.REGTYPE, b"evil")],
        "absolute": [_member(str(target), tarfile.REGTYPE, b"evil")],
        "symlink": [_member("evil", tarfile.SYMTYPE, linkname=str(target))],
        "symlink-then-write": [
            _member("link", tarfile.SYMTYPE, linkname=str(outside)),
            _member("link/evil", tarfile.REGTYPE, b"evil"),
        ],
        "hardlink": [_member("evil", tarfile.LNKTYPE, linkname=str(tmp_path / "victim"))],
        "chardev": [_member("evil", tarfile.CHRTYPE)],
        "fifo": [_member("evil", tarfile.FIFOTYPE)],
    }[case]
    (tmp_path / "victim").write_text("do not touch")
    plant_version(store, members)
    assert store.verify(USER, 1)  # the archive matches its manifest's checksum: only the content is bad
    before = {p: snapshot(tmp_path / p) for p in ("outside",)}
    dest = tmp_path / "ws" / "alice"
    with pytest.raises(UnsafeArchive):
        store.restore(USER, dest, 1)
    with pytest.raises(NoGoodVersion):
        store.restore(USER, dest)
    assert not target.exists()
    assert {p: snapshot(tmp_path / p) for p in ("outside",)} == before
    assert (tmp_path / "victim").read_text() == "do not touch"
    assert not dest.exists()
    assert listing(tmp_path / "ws") == set()  # no restore temp dir left behind
    assert sorted(os.listdir(tmp_path)) == ["outside", "store", "victim", "ws"]


def test_archive_member_not_in_manifest_is_corrupt(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    plant_version(store, [_member("evil", tarfile.REGTYPE, b"evil"), _member("extra", tarfile.REGTYPE, b"x")])
    with pytest.raises(CorruptVersion):
        store.restore(USER, tmp_path / "ws", 1)
    # the well-formed part alone restores fine
    plant_version(store, [_member("evil", tarfile.REGTYPE, b"evil")], version=2)
    store.restore(USER, tmp_path / "ws", 2)
    assert (tmp_path / "ws" / "evil").read_bytes() == b"evil"


# ------------------------------------------------------------ refusing input


def test_quota_exceeded_writes_nothing(tmp_path: Path, src: Path) -> None:
    store = DirectoryStore(tmp_path / "store", quota_bytes=100_000)
    with pytest.raises(QuotaExceeded, match="quota"):
        store.save(USER, src)
    assert not (tmp_path / "store").exists()
    # with an existing version, nothing new appears either
    small = tmp_path / "small"
    small.mkdir()
    (small / "f").write_bytes(b"x" * 10)
    store.save(USER, small)
    listing_before = sorted(os.listdir(store.user_dir(USER)))
    with pytest.raises(QuotaExceeded):
        store.save(USER, src)
    assert sorted(os.listdir(store.user_dir(USER))) == listing_before


@pytest.mark.parametrize("kind", ["symlink", "dangling-symlink", "dir-symlink", "fifo", "socket"])
def test_unsafe_source_refused(store: DirectoryStore, src: Path, kind: str) -> None:
    p = src / "a" / "special"
    if kind == "symlink":
        p.symlink_to("/etc/passwd")
    elif kind == "dangling-symlink":
        p.symlink_to("/nonexistent")
    elif kind == "dir-symlink":
        p.symlink_to("/etc", target_is_directory=True)
    elif kind == "fifo":
        os.mkfifo(p)
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    with pytest.raises(UnsafeSource, match="special"):
        store.save(USER, src)
    assert not store.root.exists()


def test_source_root_symlink_or_missing_refused(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(UnsafeSource):
        store.save(USER, link)
    with pytest.raises(StoreError):
        store.save(USER, tmp_path / "nope")


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "a/b", "../x", "a\0b", "x" * 65, "ü", "a b", "a\\b", "/abs"]
)
def test_bad_user_names_refused(store: DirectoryStore, src: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidUserName):
        store.save(name, src)
    with pytest.raises(InvalidUserName):
        store.restore(name, tmp_path / "ws")
    with pytest.raises(InvalidUserName):
        store.versions(name)
    assert not store.root.exists()


@pytest.mark.parametrize("name", ["a", "alice", "bob.smith", "u@example.com", "x-y_z", "A" * 64, "0"])
def test_good_user_names_accepted(store: DirectoryStore, src: Path, name: str) -> None:
    assert store.save(name, src).version == 1
    assert store.user_dir(name).name == name


# ------------------------------------------------------------ store errors


def test_store_root_not_a_directory(tmp_path: Path, src: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("I am a regular file")
    store = DirectoryStore(blocker / "store")
    with pytest.raises(StoreError, match="store"):
        store.save(USER, src)
    assert blocker.read_text() == "I am a regular file"


def test_store_dir_not_writable(tmp_path: Path, src: Path) -> None:
    """chmod 0o500 as a normal user; as root (which bypasses modes) the immutable attribute instead."""
    store = DirectoryStore(tmp_path / "store")
    store.save(USER, src)
    udir = store.user_dir(USER)
    before = sorted(os.listdir(udir))
    as_root = os.geteuid() == 0
    if as_root:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(udir)], capture_output=True).returncode:
            pytest.skip("running as root, which ignores chmod, and chattr +i is not available here")
    else:
        os.chmod(udir, 0o500)
    try:
        (src / "changed").write_text("new state")
        with pytest.raises(StoreError, match="not writable"):
            store.save(USER, src)
        assert sorted(os.listdir(udir)) == before
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(udir)], check=True)
        else:
            os.chmod(udir, 0o700)
    assert [v.version for v in store.versions(USER)] == [1]
    assert store.verify(USER, 1)
    assert store.save(USER, src).version == 2


CHILD_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    from cloudq.workers.store import DirectoryStore, StoreError

    root, src = sys.argv[1:3]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        DirectoryStore(root).save("alice", src)
    except StoreError as e:
        sys.stdout.write("StoreError: %s\\n" % e)
    else:
        sys.stdout.write("saved\\n")
    """
)


def test_store_full_leaves_previous_version(tmp_path: Path, src: Path) -> None:
    """A write failing mid-archive (EFBIG via RLIMIT_FSIZE stands in for ENOSPC) -> StoreError."""
    store = DirectoryStore(tmp_path / "store")
    small = tmp_path / "small"
    small.mkdir()
    (small / "f").write_text("v1")
    store.save(USER, small)
    out = subprocess.run(
        [sys.executable, "-P", "-c", CHILD_FULL, str(store.root), str(src)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.startswith("StoreError:") and "full" in out, out
    assert [v.version for v in store.versions(USER)] == [1]
    assert store.verify(USER, 1)
    assert temp_files(store.user_dir(USER)) == []
    assert sorted(os.listdir(store.user_dir(USER))) == ["00000001.json", "00000001.tar"]


def test_restore_into_unwritable_place_is_store_error(
    store: DirectoryStore, src: Path, tmp_path: Path
) -> None:
    store.save(USER, src)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError) as ei:
        store.restore(USER, blocker / "ws")
    assert not isinstance(ei.value, CorruptVersion)  # not mistaken for a bad version


# ------------------------------------------------------------ promote, progress


def test_promote_makes_old_version_newest(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    (src / "state").write_text("one")
    store.save(USER, src)
    (src / "state").write_text("two")
    store.save(USER, src)
    info = store.promote(USER, 1)
    assert info.version == 3 and info.promoted_from == 1
    assert [v.version for v in store.versions(USER)] == [1, 2, 3]
    assert store.verify(USER, 3)
    assert store.show(USER).promoted_from == 1
    store.restore(USER, tmp_path / "ws")
    assert (tmp_path / "ws" / "state").read_text() == "one"
    with pytest.raises(VersionNotFound):
        store.promote(USER, 42)


def test_promote_refuses_corrupt_version(store: DirectoryStore, src: Path) -> None:
    store.save(USER, src)
    store.save(USER, src)
    flip_byte_in_member_data(store.user_dir(USER) / "00000001.tar", "top.bin")
    with pytest.raises(CorruptVersion):
        store.promote(USER, 1)
    assert [v.version for v in store.versions(USER)] == [1, 2]
    assert temp_files(store.user_dir(USER)) == []


def test_progress_increases_to_total(tmp_path: Path, src: Path) -> None:
    store = DirectoryStore(tmp_path / "store", chunk_size=64 * 1024)
    (src / "large.bin").write_bytes(os.urandom(1_000_000))
    calls: list[tuple[int, int]] = []
    info = store.save(USER, src, progress=lambda d, t: calls.append((d, t)))
    assert len(calls) > 10
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    assert calls[0][0] == 0
    assert calls[-1] == (info.total_size, info.total_size)
    assert all(t == info.total_size for _, t in calls)

    calls.clear()
    store.restore(USER, tmp_path / "ws", progress=lambda d, t: calls.append((d, t)))
    dones = [d for d, _ in calls]
    assert len(calls) > 10 and dones == sorted(dones)
    assert calls[-1] == (info.total_size, info.total_size)


# ------------------------------------------------------------ property


_names = st.text(alphabet="abcXYZ019_-. é", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(st.lists(_names, min_size=1, max_size=3).map(tuple), st.binary(max_size=3000)))
def test_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory, tree: dict[tuple[str, ...], bytes]
) -> None:
    base = tmp_path_factory.mktemp("prop")
    src = base / "src"
    src.mkdir()
    written: set[tuple[str, ...]] = set()
    for parts, data in sorted(tree.items(), key=lambda kv: len(kv[0])):
        # skip paths that clash with an already written file or directory
        if any(parts[:i] in written for i in range(1, len(parts) + 1)):
            continue
        if any(w[: len(parts)] == parts for w in written):
            continue
        p = src.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        written.add(parts)
    store = DirectoryStore(base / "store")
    store.save(USER, src)
    store.restore(USER, base / "ws")
    assert snapshot(base / "ws") == snapshot(src)


def test_corrupt_tar_header_is_detected(store: DirectoryStore, src: Path, tmp_path: Path) -> None:
    store.save(USER, src)
    store.save(USER, src)
    archive = store.user_dir(USER) / "00000002.tar"
    with tarfile.open(archive) as tf:
        header_off = tf.getmember("a/big.bin").offset  # a header in the middle of the archive
    with open(archive, "r+b") as f:
        f.seek(header_off + 2)
        f.write(b"Q")
    info = store.restore(USER, tmp_path / "ws")
    assert (info.version, info.fell_back_from) == (1, 2)
    assert snapshot(tmp_path / "ws") == snapshot(src)


def test_a_workspace_that_matches_the_newest_version_is_recognised_and_any_change_is_not(
    store: DirectoryStore, src: Path, tmp_path: Path
) -> None:
    """What lets a save write nothing when nothing changed (``matches_newest``): a restored tree
    matches its version; a new file, a removed one, a new directory, a mode, or the same size
    with other bytes (mtime now) does not."""
    assert store.matches_newest(USER, src) is None, "no version yet"
    store.save(USER, src)
    ws = tmp_path / "ws"
    store.restore(USER, ws)
    assert store.matches_newest(USER, ws) == 1 and store.matches_newest(USER, src) == 1
    (ws / "new.txt").write_text("x")
    assert store.matches_newest(USER, ws) is None
    (ws / "new.txt").unlink()
    (ws / "new-dir").mkdir()
    assert store.matches_newest(USER, ws) is None
    (ws / "new-dir").rmdir()
    big = ws / "a" / "big.bin"
    data = big.read_bytes()
    big.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, other content, mtime now
    assert store.matches_newest(USER, ws) is None
    big.write_bytes(data)  # back as it was (mtime now: its content is hashed and matches)
    assert store.matches_newest(USER, ws) == 1
    big.chmod(0o600 if (big.stat().st_mode & 0o777) != 0o600 else 0o644)
    assert store.matches_newest(USER, ws) is None


def test_a_file_rewritten_while_a_save_ran_is_not_taken_as_unchanged(
    store: DirectoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unchanged check hashes files modified since the newest version's save *began*: a file
    rewritten (same size) after the save had read it, during a save that took longer than the
    check's slack, differs from the archive, though its mtime is older than the version."""
    import datetime as dt

    from cloudq.workers.store import directory

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_bytes(b"aaaa")
    (ws / "b.txt").write_bytes(b"bbbb")
    stamps = iter([0.0, 10.0])  # the save began now and ended 10 s later (a slow, large save)
    monkeypatch.setattr(
        directory,
        "_now_iso",
        lambda: (
            (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=next(stamps)))
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        ),
    )
    rewritten = []

    def progress(done: int, total: int) -> None:
        if done >= 4 and not rewritten:  # a.txt is in the archive: the user's program rewrites it
            (ws / "a.txt").write_bytes(b"AAAA")
            rewritten.append(True)

    store.save(USER, ws, progress=progress)
    assert rewritten
    assert store.matches_newest(USER, ws) is None, "a.txt is not what the version holds"
    restored = tmp_path / "restored"
    store.restore(USER, restored)
    assert (restored / "a.txt").read_bytes() == b"aaaa"


def test_a_file_whose_mtime_alone_changed_is_unchanged(
    store: DirectoryStore, src: Path, tmp_path: Path
) -> None:
    """Decided: the content decides. A ``touch`` (or the same bytes written again) is no change,
    so no new version; the version keeps the old mtime, which a restore gives back."""
    store.save(USER, src)
    ws = tmp_path / "ws"
    store.restore(USER, ws)
    f = next(p for p in sorted(ws.rglob("*")) if p.is_file())
    os.utime(f)  # mtime now, content as it was
    f.write_bytes(f.read_bytes())  # and the same bytes written again
    assert store.matches_newest(USER, ws) == 1


# ------------------------------------------------------------ the archive's digest, the hashing process


def member_digest(archive: Path) -> str:
    """The archive digest recomputed with ``tarfile`` (not the store's parser): sha256 of the
    archive with each regular file's data replaced by that data's sha256."""
    raw = archive.read_bytes()
    tree = hashlib.sha256()
    pos = 0
    with tarfile.open(archive) as tf:
        for ti in tf.getmembers():
            if ti.isreg():
                end = ti.offset_data + ti.size
                tree.update(raw[pos : ti.offset_data])
                tree.update(hashlib.sha256(raw[ti.offset_data : end]).digest())
                pos = end
    tree.update(raw[pos:])
    return tree.hexdigest()


def children() -> set[int]:
    """This process's live child processes (every thread's)."""
    out: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            out.update(int(p) for p in f.read().split())
    return out


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_the_archive_digest_covers_every_byte_and_each_file_is_hashed_once(
    tmp_path: Path, src: Path, process: bool
) -> None:
    (src / "empty").write_bytes(b"")
    (src / "a" / "odd.bin").write_bytes(os.urandom(70_001))  # data ending inside a block
    store = DirectoryStore(tmp_path / "store", chunk_size=64 * 1024, hash_process_bytes=1 if process else 0)
    info = store.save(USER, src)
    archive = store.user_dir(USER) / f"{info.version:08d}.tar"
    m = store.show(USER)
    assert m.format == 2
    assert m.archive_sha256 == member_digest(archive)
    for f in m.files:
        assert f.sha256 == hashlib.sha256((src / f.path).read_bytes()).hexdigest()
    assert store.verify(USER, info.version)
    with tarfile.open(archive) as tf:
        odd = tf.getmember("a/odd.bin")
        empty = tf.getmember("empty")
    size = archive.stat().st_size
    good = archive.read_bytes()
    # a header, an empty file's header, file data, the padding after it, the end blocks
    for where in (
        odd.offset + 3,
        empty.offset + 1,
        odd.offset_data + 50_000,
        odd.offset_data + 70_002,
        size - 1,
    ):
        bad = bytearray(good)
        bad[where] ^= 0x01
        archive.write_bytes(bad)
        assert not store.verify(USER, info.version), where
    archive.write_bytes(good)
    assert store.verify(USER, info.version)
    store.restore(USER, tmp_path / "ws")
    assert snapshot(tmp_path / "ws") == snapshot(src)


def test_a_process_hashed_save_equals_a_thread_hashed_one_and_leaves_no_process(
    tmp_path: Path, src: Path
) -> None:
    before = children()
    a = DirectoryStore(tmp_path / "a", hash_process_bytes=0).save(USER, src)
    b = DirectoryStore(tmp_path / "b", hash_process_bytes=1).save(USER, src)
    assert a.archive_sha256 == b.archive_sha256
    assert (tmp_path / "a" / USER / "00000001.tar").read_bytes() == (
        tmp_path / "b" / USER / "00000001.tar"
    ).read_bytes()
    assert DirectoryStore(tmp_path / "a").show(USER).files == DirectoryStore(tmp_path / "b").show(USER).files
    assert children() <= before


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_hashing_process_that_dies_or_hangs_fails_the_save_and_keeps_the_old_version(
    tmp_path: Path, src: Path, how: str
) -> None:
    store = DirectoryStore(tmp_path / "store", chunk_size=64 * 1024, hash_process_bytes=1, hash_timeout=0.5)
    old = store.save(USER, src)
    (src / "large.bin").write_bytes(os.urandom(2_000_000))
    before = children()
    hit: list[int] = []

    def progress(done: int, total: int) -> None:
        if done and not hit:
            (pid,) = children() - before
            os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            hit.append(pid)

    t0 = time.monotonic()
    why = "hashing process died" if how == "killed" else "did not answer within 0.5 s"
    with pytest.raises(StoreError, match=re.escape(why)):
        store.save(USER, src, progress=progress)
    assert hit and time.monotonic() - t0 < 10
    assert children() <= before  # reaped (a stopped one killed first)
    assert temp_files(store.user_dir(USER)) == []
    assert [v.version for v in store.versions(USER)] == [old.version]
    assert store.verify(USER, old.version)
