"""``cloudq acl print``: the ACL file for a prefix."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from cloudq.cli.common import (
    prefix_option,
)
from cloudq.keys import Keys


@click.group("acl")
def acl() -> None:
    """Redis ACL users (see the Security section of README)."""


def _role_password_options(f: Callable[..., Any]) -> Callable[..., Any]:
    from cloudq.central.acl import ROLES

    for role in reversed(ROLES):
        env = f"CLOUDQ_ACL_{role.upper()}_PASSWORD"
        f = click.option(
            f"--{role}-password",
            envvar=env,
            show_envvar=True,
            default=None,
            help=f"Password of the cloudq-{role} user (default: random, printed to stderr).",
        )(f)
    return f


@acl.command("print")
@prefix_option
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None, help="Write to FILE.")
@_role_password_options
def acl_print(prefix: str, out: str | None, **pw: str | None) -> None:
    """Write the ACL file for this prefix (role users, login user, default user)."""
    from cloudq.central.acl import ROLES, Passwords, acl_file

    given = {role: pw.get(f"{role}_password") or "" for role in ROLES}
    passwords = Passwords(dict(given))
    text = acl_file(Keys(prefix), passwords)
    for role in ROLES:
        if not given[role]:
            click.echo(f"CLOUDQ_ACL_{role.upper()}_PASSWORD={passwords[role]}", err=True)
    if out:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text, nl=False)
