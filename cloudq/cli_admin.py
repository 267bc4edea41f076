"""Operator commands: drain and undrain a node, close a session, disable and enable a user.

Each is one transition script (``cloudq/scripts/drain.lua``, ``admin_close.lua``,
``user_disable.lua``) that records in the ``events`` stream who did it (the OS user running the
command) and why. Closing goes through the sweeper's close deadline, so the user's data is saved
and the node freed exactly as for any other close, and a lost job is re-issued.
"""

from __future__ import annotations

import getpass
import sys
from typing import NoReturn

import click
import redis

from cloudq.keys import Keys
from cloudq.state import StateMachine

url_option = click.option(
    "--redis-url", envvar="CLOUDQ_REDIS_URL", show_envvar=True, help="Redis URL (env CLOUDQ_REDIS_URL)."
)
prefix_option = click.option(
    "--prefix", envvar="CLOUDQ_PREFIX", default="cloudq:", show_default=True, help="Key prefix."
)
why_option = click.option("--reason", default="", help="Why (recorded in the events stream).")


def operator() -> str:
    """Who runs this command, for the events stream."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"cloudq: {message}", err=True)
    sys.exit(code)


def _machine(redis_url: str | None, prefix: str) -> StateMachine:
    if not redis_url:
        raise click.UsageError("no Redis given: pass --redis-url or set CLOUDQ_REDIS_URL")
    r = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    return StateMachine(r, Keys(prefix))


def _run(fn, *args: object):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except redis.ConnectionError as exc:
        _fail(f"cannot reach Redis: {exc}", 5)


def _drain(node_id: str, on: bool, redis_url: str | None, prefix: str, reason: str) -> None:
    sm = _machine(redis_url, prefix)
    if not _run(sm.drain, node_id, on, operator(), reason):
        _fail(f"no node {node_id!r}")


@click.command("drain")
@url_option
@prefix_option
@why_option
@click.argument("node_id")
def node_drain(redis_url: str | None, prefix: str, reason: str, node_id: str) -> None:
    """Take NODE_ID out of rotation: its session goes on, it takes no new one, it leaves the pool."""
    _drain(node_id, True, redis_url, prefix, reason)
    click.echo(f"node {node_id} drained: it takes no new session")


@click.command("undrain")
@url_option
@prefix_option
@why_option
@click.argument("node_id")
def node_undrain(redis_url: str | None, prefix: str, reason: str, node_id: str) -> None:
    """Put NODE_ID back into rotation."""
    _drain(node_id, False, redis_url, prefix, reason)
    click.echo(f"node {node_id} back in rotation")


@click.group()
def session() -> None:
    """Manage sessions."""


@session.command("close")
@url_option
@prefix_option
@click.option("--reason", default="closed by the operator", show_default=True, help="Shown to the user.")
@click.argument("sid")
def session_close(redis_url: str | None, prefix: str, reason: str, sid: str) -> None:
    """Close session SID: its data is saved, its node freed, its client told REASON."""
    sm = _machine(redis_url, prefix)
    status = _run(sm.admin_close, sid, f"admin: {reason}", operator())
    if status == "gone":
        _fail(f"no live session {sid!r}")
    click.echo(f"session {sid} {'is already closing' if status == 'closing' else 'is closing'}")


def _disable(name: str, on: bool, redis_url: str | None, prefix: str, reason: str) -> str:
    sm = _machine(redis_url, prefix)
    sid = _run(sm.user_disable, name, on, operator(), reason)
    if sid is None:
        _fail(f"no user {name!r}")
    return sid


@click.command("disable")
@url_option
@prefix_option
@why_option
@click.argument("name")
def user_disable(redis_url: str | None, prefix: str, reason: str, name: str) -> None:
    """Refuse NAME's logins and close their live session (data saved)."""
    sid = _disable(name, True, redis_url, prefix, reason)
    click.echo(f"user {name} disabled" + (f"; session {sid} is closing" if sid else ""))


@click.command("enable")
@url_option
@prefix_option
@why_option
@click.argument("name")
def user_enable(redis_url: str | None, prefix: str, reason: str, name: str) -> None:
    """Let NAME log in again."""
    _disable(name, False, redis_url, prefix, reason)
    click.echo(f"user {name} enabled")
