"""``cloudq data …`` and ``cloudq bench data``: the user-data store from the command line."""

from __future__ import annotations

import json
import sys

import click

from cloudq.workers.data import open_store
from cloudq.workers.store import StoreError

store_option = click.option(
    "--store",
    envvar="CLOUDQ_STORE",
    default=None,
    show_envvar=True,
    help="Store directory (env CLOUDQ_STORE).",
)


def _fail(message: str) -> None:
    click.echo(f"cloudq: {message}", err=True)
    sys.exit(1)


@click.group()
def data() -> None:
    """Inspect and restore saved user data."""


@data.command("ls")
@store_option
@click.argument("user")
@click.option("--json", "as_json", is_flag=True)
def data_ls(store: str | None, user: str, as_json: bool) -> None:
    """List USER's saved versions, oldest first."""
    try:
        versions = open_store(store).versions(user)
    except StoreError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps([v.__dict__ for v in versions], default=str))
        return
    if not versions:
        click.echo(f"no saved data for {user}")
    for v in versions:
        extra = f" (restored from {v.promoted_from})" if getattr(v, "promoted_from", None) else ""
        click.echo(f"{v.version:>6}  {v.created}  {v.file_count:>6} files  {v.total_size:>12,} bytes{extra}")


@data.command("show")
@store_option
@click.argument("user")
@click.argument("version", type=int, required=False)
def data_show(store: str | None, user: str, version: int | None) -> None:
    """Show the manifest of a version (default: the newest)."""
    try:
        m = open_store(store).show(user, version)
    except StoreError as exc:
        _fail(str(exc))
    info = m.info()
    click.echo(
        f"{user} version {info.version}: {info.file_count} files, {info.total_size:,} bytes, {info.created}"
    )
    for f in m.files:
        click.echo(f"  {f.size:>12,}  {f.sha256[:16]}  {f.path}")


@data.command("restore")
@store_option
@click.argument("user")
@click.argument("version", type=int)
def data_restore(store: str | None, user: str, version: int) -> None:
    """Make VERSION the newest (its data is copied as a new version, after verification)."""
    st = open_store(store)
    try:
        total = st.show(user, version).archive_size
        with click.progressbar(
            length=max(total, 1), label=f"restoring {user} v{version}", file=sys.stderr
        ) as bar:
            done = [0]

            def progress(n: int, _total: int) -> None:
                bar.update(max(0, n - done[0]))
                done[0] = max(done[0], n)

            info = st.promote(user, version, progress=progress)
    except StoreError as exc:
        _fail(str(exc))
    click.echo(f"{user}: version {version} is now the newest, as version {info.version}")


@click.command("data")
@click.option("--sizes", default="1,10,100", show_default=True, help="MiB of user data per case.")
@click.option("--workdir", default=None, help="Where to create the files (default: a temp dir).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--write/--no-write", default=True, help="Write the table into BENCHMARKS.md.")
def bench_data(sizes: str, workdir: str | None, as_json: bool, write: bool) -> None:
    """Mount (restore) and save time vs tar extracting and creating the same files."""
    from cloudq.benchmd import machine, write_section
    from cloudq.workers import benchdata

    result = benchdata.run(tuple(int(s) for s in sizes.split(",")), workdir)
    table = benchdata.format_table(result)
    if write:
        write_section(
            "User data: mount and save vs tar",
            f"""`DirectoryStore.save` (archive + manifest, fsync'd, atomic) and `restore` (verified extraction
into a fresh directory, then swapped in) against GNU `tar -cf` (+ an fsync of the archive, so both
are durable) and `tar -xf` on the same files in the same run; median of 3.

{table}

Machine: {machine()}.
Rerun: `cloudq bench data` (`--sizes 1,10,100`, `--workdir DIR` to measure another filesystem, `--json`).""",
        )
    click.echo(json.dumps(result, indent=2) if as_json else table)
