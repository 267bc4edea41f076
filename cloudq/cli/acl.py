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
@click.option(
    "--url-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write each role's Redis URL, with its password, to DIR/<role>/redis.url (mode 0600) "
    "for that role's --redis-url-file (docker-compose.yml mounts only its own directory into each service).",
)
@click.option(
    "--server-url",
    default="redis://127.0.0.1:6379/0",
    show_default=True,
    help="The server the URLs of --url-dir point at (without credentials); a redis+sentinel:// URL "
    "(host:port,host:port/SERVICE/DB) gives Sentinel URLs.",
)
@click.option(
    "--replication-conf",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write a server config include (masteruser/masterauth as cloudq-admin, mode 0600) "
    "for data servers that replicate.",
)
@click.option(
    "--sentinel-conf",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write Sentinel config lines (sentinel auth-user/auth-pass as cloudq-admin, mode 0600) "
    "for the service --server-url names (its SERVICE if a Sentinel URL, else 'cloudq').",
)
@_role_password_options
def acl_print(
    prefix: str,
    out: str | None,
    url_dir: str | None,
    server_url: str,
    replication_conf: str | None,
    sentinel_conf: str | None,
    **pw: str | None,
) -> None:
    """Write the ACL file for this prefix (role users, login user, default user)."""
    from cloudq.central import acl as acl_mod
    from cloudq.central.acl import ROLES, Passwords, acl_file, role_urls
    from cloudq.connection import is_sentinel, parse_sentinel
    from cloudq.secretfile import write_secret

    for role in ROLES:  # read: no child of this process inherits them
        os.environ.pop(f"CLOUDQ_ACL_{role.upper()}_PASSWORD", None)
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
    if replication_conf:
        write_secret(replication_conf, acl_mod.replication_conf(passwords).rstrip("\n"))
        click.echo(f"wrote {replication_conf}", err=True)
    if sentinel_conf:
        service = parse_sentinel(server_url).service if is_sentinel(server_url) else "cloudq"
        write_secret(sentinel_conf, acl_mod.sentinel_auth_conf(service, passwords).rstrip("\n"))
        click.echo(f"wrote {sentinel_conf}", err=True)
    if url_dir:
        urls = role_urls(server_url, passwords)
        for role in ROLES:
            write_secret(os.path.join(url_dir, role, "redis.url"), urls[role])
        click.echo(f"wrote {os.path.join(url_dir, '<role>', 'redis.url')} for {', '.join(ROLES)}", err=True)
