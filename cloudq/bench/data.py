"""Benchmark: :class:`DirectoryStore` save/mount against GNU ``tar -cf`` / ``tar -xf`` on the same files.

``run()`` generates user data of each size (half the bytes in many small files spread over nested
directories, half in a few large files; random bytes, so nothing is trivially compressible) and
times, in the same run and on the same files, the median of ``repeats`` runs of:

* ``save_s``: ``DirectoryStore.save`` (fsyncs the archive, the manifest and the directory) into
  a store whose user directory exists, as tar's output directory does (a user's first save also
  creates and fsyncs that directory: once per user, not per save).
* ``tar_create_s``: ``tar -cf`` of the same directory **plus an fsync of the archive it wrote**.
  GNU tar never fsyncs; adding the fsync of its output inside the timed region makes it do the same
  durable work the store does, so ``save_ratio`` compares like with like. The unfsynced pair
  (``save_nofsync_s`` with ``DirectoryStore(fsync=False)`` vs ``tar_create_nofsync_s``) is reported too.
* ``mount_s``: ``DirectoryStore.restore`` into a fresh directory (checksums verified, no fsync:
  a workspace is a scratch copy) vs ``tar_extract_s``: ``tar -xf`` into a fresh directory (tar
  does not fsync either, and verifies nothing).

Every timed step starts after an untimed ``os.sync()``, so dirty pages left by the previous step are
not flushed on the next step's clock; the order of store and tar alternates between repeats. Both
read sources from a warm page cache (the data was just generated / the archive just written).

``cloudq bench data`` prints the table.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cloudq.bench.report import machine, write_section
from cloudq.percentile import percentile
from cloudq.workers.store import DirectoryStore

log = logging.getLogger(__name__)

MIB = 1024 * 1024
USER = "bench"


def make_user_data(dest: Path, mib: float, *, seed: int = 0) -> int:
    """Fill ``dest`` with ``mib`` MiB: half in small files (256 B-32 KiB) in nested dirs, half in
    three large files. Returns the number of files."""
    rng = random.Random(seed)
    total = int(mib * MIB)
    small_budget = total // 2
    large_budget = total - small_budget
    count = 0
    written = 0
    while written < small_budget:
        size = min(rng.randint(256, 32 * 1024), small_budget - written)
        d = dest / f"d{count % 16:02d}" / f"s{(count // 16) % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{count:06d}.dat").write_bytes(rng.randbytes(size))
        written += size
        count += 1
    big = dest / "big"
    big.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        size = large_budget // 3 + (large_budget % 3 if i == 2 else 0)
        with open(big / f"large{i}.bin", "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MIB)
                f.write(rng.randbytes(n))
                left -= n
        count += 1
    return count


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(setup: Callable[[], None], action: Callable[[], None]) -> float:
    setup()
    os.sync()  # untimed: start every measurement with no dirty pages pending
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def _rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _tar(*args: str) -> None:
    subprocess.run(["tar", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def bench_size(mib: float, work: Path, *, repeats: int = 3) -> dict[str, Any]:
    src = work / "src"
    nfiles = make_user_data(src, mib)
    tar_out = work / "out.tar"
    tar_dest = work / "tar-dest"
    store_root = work / "store"
    mount_dest = work / "mount-dest"
    ref_store = DirectoryStore(work / "ref-store", quota_bytes=2 * int(mib * MIB) + MIB)
    ref_store.save(USER, src)
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "save_s",
            "save_nofsync_s",
            "tar_create_s",
            "tar_create_nofsync_s",
            "mount_s",
            "tar_extract_s",
        )
    }
    quota = 2 * int(mib * MIB) + MIB

    def clear(*paths: Path) -> Callable[[], None]:
        return lambda: [_rm(p) for p in paths] and None

    def fresh_store() -> None:
        # steady state: the user's directory in the store exists (as tar's output directory does)
        _rm(store_root)
        (store_root / USER).mkdir(parents=True)

    def tar_create_fsync() -> None:
        _tar("-cf", str(tar_out), "-C", str(src), ".")
        _fsync_file(tar_out)  # GNU tar does not fsync; do it for tar too (the store fsyncs)

    def tar_extract() -> None:
        tar_dest.mkdir()
        _tar("-xf", str(tar_out), "-C", str(tar_dest))

    for rep in range(repeats):
        store_steps = [
            (
                "save_s",
                fresh_store,
                lambda: DirectoryStore(store_root, quota_bytes=quota).save(USER, src),
            ),
            (
                "save_nofsync_s",
                fresh_store,
                lambda: DirectoryStore(store_root, quota_bytes=quota, fsync=False).save(USER, src),
            ),
            ("mount_s", clear(mount_dest), lambda: ref_store.restore(USER, mount_dest)),
        ]
        tar_steps = [
            ("tar_create_s", clear(tar_out), tar_create_fsync),
            ("tar_create_nofsync_s", clear(tar_out), lambda: _tar("-cf", str(tar_out), "-C", str(src), ".")),
            ("tar_extract_s", clear(tar_dest), tar_extract),
        ]
        order = store_steps + tar_steps if rep % 2 == 0 else tar_steps + store_steps
        for key, setup, action in order:
            times[key].append(_timed(setup, action))
    for p in (store_root, mount_dest, tar_out, tar_dest):
        _rm(p)
    med = {k: percentile(v, 50) for k, v in times.items()}
    row: dict[str, Any] = {"mib": mib, "files": nfiles, **{k: round(v, 4) for k, v in med.items()}}
    row["mount_ratio"] = round(med["mount_s"] / med["tar_extract_s"], 2)
    row["save_ratio"] = round(med["save_s"] / med["tar_create_s"], 2)
    row["save_nofsync_ratio"] = round(med["save_nofsync_s"] / med["tar_create_nofsync_s"], 2)
    log.info("benchdata %s MiB: %s", mib, row)
    return row


def run(
    sizes_mib: Sequence[float] = (1, 10, 100),
    workdir: str | os.PathLike[str] | None = None,
    *,
    repeats: int = 3,
) -> dict[str, Any]:
    """Time store save/mount vs tar for each size; returns ``{"sizes": [row, ...]}``.

    Each row: ``mib, files, mount_s, save_s, tar_extract_s, tar_create_s, mount_ratio,
    save_ratio`` plus the unfsynced pair ``save_nofsync_s, tar_create_nofsync_s,
    save_nofsync_ratio``. Temp directories (under ``workdir`` if given) are removed.
    """
    if shutil.which("tar") is None:
        raise RuntimeError("benchdata needs GNU tar on PATH")
    rows = []
    for mib in sizes_mib:
        work = Path(tempfile.mkdtemp(prefix="cloudq-bench-", dir=workdir))
        try:
            rows.append(bench_size(mib, work, repeats=repeats))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"sizes": rows}


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`run` result."""
    lines = [
        "| MiB | files | save s | tar -cf+fsync s | save ratio | save (no fsync) s | tar -cf s | ratio "
        "| mount s | tar -xf s | mount ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["sizes"]:
        lines.append(
            f"| {r['mib']:g} | {r.get('files', '')} | {r['save_s']:.4f} | {r['tar_create_s']:.4f} "
            f"| {r['save_ratio']:.2f} | {r.get('save_nofsync_s', float('nan')):.4f} "
            f"| {r.get('tar_create_nofsync_s', float('nan')):.4f} "
            f"| {r.get('save_nofsync_ratio', float('nan')):.2f} "
            f"| {r['mount_s']:.4f} | {r['tar_extract_s']:.4f} | {r['mount_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(result: dict[str, Any], path: str) -> None:
    write_section(
        "User data: mount and save vs tar",
        f"""`DirectoryStore.save` (archive + manifest, fsync'd, atomic) and `restore` (verified extraction
into a fresh directory, then swapped in) against GNU `tar -cf` (+ an fsync of the archive, so both
are durable) and `tar -xf` on the same files in the same run; median of 3.

{format_table(result)}

Machine: {machine()}.
Rerun: `cloudq bench data --write BENCHMARKS.md` (`--sizes 1,10,100`, `--workdir DIR` to measure
another filesystem, `--json`).""",
        path,
    )
