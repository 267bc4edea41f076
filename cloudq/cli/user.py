"""``cloudq user …``: manage users (add, passwd, del, list, disable, enable)."""

from __future__ import annotations

import json

import click
import redis

from cloudq.cli.common import (
    _connect,
    _cost_opt,
    _fail,
    _machine,
    _read_password,
    _run,
    operator,
    prefix_option,
    redis_url_option,
    why_option,
)
from cloudq.keys import Keys


@click.group()
def user() -> None:
    """Manage users."""


_stdin_opt = click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")


@user.command("add")
@redis_url_option
@prefix_option
@click.argument("name")
@_stdin_opt
@_cost_opt
def user_add(redis_url: str | None, prefix: str, name: str, password_stdin: bool, bcrypt_cost: int) -> None:
    """Add a user."""
    from cloudq.central.auth import AuthError, Users

    try:
        Users(_connect(redis_url), Keys(prefix)).add(name, _read_password(password_stdin), cost=bcrypt_cost)
    except AuthError as exc:
        _fail(str(exc))
    click.echo(f"added user {name}")


@user.command("passwd")
@redis_url_option
@prefix_option
@click.argument("name")
@_stdin_opt
@_cost_opt
def user_passwd(
    redis_url: str | None, prefix: str, name: str, password_stdin: bool, bcrypt_cost: int
) -> None:
    """Change a user's password (and lift a lockout)."""
    from cloudq.central.auth import AuthError, Users

    try:
        Users(_connect(redis_url), Keys(prefix)).passwd(
            name, _read_password(password_stdin), cost=bcrypt_cost
        )
    except AuthError as exc:
        _fail(str(exc))
    click.echo(f"password changed for {name}")


@user.command("del")
@redis_url_option
@prefix_option
@click.argument("name")
@click.option("--purge", is_flag=True, help="Also delete the user's stored data (every version).")
@click.option("--store", envvar="CLOUDQ_STORE", default=None, help="User-data store (with --purge).")
def user_del(redis_url: str | None, prefix: str, name: str, purge: bool, store: str | None) -> None:
    """Delete a user: tokens revoked, a live session closed (its data saved). The stored data
    stays (an operator can still restore it; a new account of the same name starts empty)
    unless --purge."""
    from cloudq.central.auth import AuthError, Users
    from cloudq.cli.data import purge_user

    r = _connect(redis_url)
    keys = Keys(prefix)
    try:
        sid = Users(r, keys).delete(name)
    except AuthError as exc:
        _fail(str(exc))
    except redis.ConnectionError as exc:
        _fail(f"cannot reach Redis: {exc}", 5)
    click.echo(f"deleted user {name}" + (f"; closing session {sid}" if sid else ""))
    if purge:
        try:
            purge_user(r, keys, name, sid, store)
        except RuntimeError as exc:
            _fail(str(exc))
        click.echo(f"deleted the stored data of {name}")


@user.command("list")
@redis_url_option
@prefix_option
@click.option("--json", "as_json", is_flag=True)
def user_list(redis_url: str | None, prefix: str, as_json: bool) -> None:
    """List users."""
    from cloudq.central.auth import Users

    rows = Users(_connect(redis_url), Keys(prefix)).list()
    if as_json:
        click.echo(json.dumps(rows))
        return
    for u in rows:
        flags = " ".join(
            f for f, on in (("locked", u["locked"] == "1"), ("disabled", u["disabled"] == "1")) if on
        )
        click.echo(f"{u['user']:<20} session={u['session'] or '-'} {flags}".rstrip())


def _disable(name: str, on: bool, redis_url: str | None, prefix: str, reason: str) -> str:
    sm = _machine(redis_url, prefix)
    sid = _run(sm.user_disable, name, on, operator(), reason)
    if sid is None:
        _fail(f"no user {name!r}")
    return sid


@user.command("disable")
@redis_url_option
@prefix_option
@why_option
@click.argument("name")
def user_disable(redis_url: str | None, prefix: str, reason: str, name: str) -> None:
    """Refuse NAME's logins and close their live session (data saved)."""
    sid = _disable(name, True, redis_url, prefix, reason)
    click.echo(f"user {name} disabled" + (f"; session {sid} is closing" if sid else ""))


@user.command("enable")
@redis_url_option
@prefix_option
@why_option
@click.argument("name")
def user_enable(redis_url: str | None, prefix: str, reason: str, name: str) -> None:
    """Let NAME log in again."""
    _disable(name, False, redis_url, prefix, reason)
    click.echo(f"user {name} enabled")
