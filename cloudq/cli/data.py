"""``cloudq data …``: the user-data store from the command line.

CLI wiring: the store (``cloudq.workers``) is imported only when a ``data`` command runs, so
every other ``cloudq`` command starts without it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from cloudq.workers.store import Store


store_option = click.option(
    "--store",
    envvar="CLOUDQ_STORE",
    default=None,
    show_envvar=True,
    help="Store directory (env CLOUDQ_STORE).",
)


def _fail(message: str) -> NoReturn:
    click.echo(f"cloudq: {message}", err=True)
    sys.exit(1)


def open_store(store: str | None) -> Store:
    from cloudq.workers.data import open_store

    return open_store(store)


def _store_errors() -> type[Exception]:
    from cloudq.workers.store import StoreError

    return StoreError


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
    except _store_errors() as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(v) for v in versions], default=str))
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
    except _store_errors() as exc:
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
    except _store_errors() as exc:
        _fail(str(exc))
    click.echo(f"{user}: version {version} is now the newest, as version {info.version}")


def purge_user(r: object, keys: object, user: str, sid: str, store: str | None) -> None:
    """``cloudq user del --purge``: wait for the user's session to close, then delete every
    stored version. Raises RuntimeError with a message for the user."""
    from cloudq.workers.data import DataError, purge_user_data

    try:
        purge_user_data(r, keys, user, sid, store)  # type: ignore[arg-type]
    except DataError as exc:
        raise RuntimeError(str(exc)) from None
