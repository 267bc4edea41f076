"""What every ``cloudq`` command module shares: the Redis connection of a server-side process,
the common options, failing with a clear message and exit code, signal handling."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click
import redis

from cloudq.keys import Keys

DEFAULT_SOCKET_TIMEOUT = 10.0
"""Seconds a server-side Redis call may wait for an answer (env CLOUDQ_SOCKET_TIMEOUT, 0 = off)."""

"""Seconds a server-side Redis call may wait for an answer (env CLOUDQ_SOCKET_TIMEOUT, 0 = off)."""


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")


def _connect(url: str | None) -> redis.Redis:
    if not url:
        raise click.UsageError(
            "no Redis given: pass --redis-url or set CLOUDQ_REDIS_URL (or run `cloudq up`)"
        )
    # a socket timeout (longer than any blocking read we issue: <= 1 s) and health checks, so a
    # half-open TCP connection raises and is replaced instead of hanging a server process
    try:
        timeout = float(os.environ.get("CLOUDQ_SOCKET_TIMEOUT") or DEFAULT_SOCKET_TIMEOUT)
    except ValueError:
        raise click.UsageError("CLOUDQ_SOCKET_TIMEOUT must be a number of seconds (0 = off)") from None
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=timeout or None,
        socket_keepalive=True,
        health_check_interval=10,
    )


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"cloudq: {message}", err=True)
    sys.exit(code)


def _warn_if_trusted(r: redis.Redis, keys: Keys, who: str) -> None:
    from cloudq.acl import warn_if_trusted

    with contextlib.suppress(redis.ConnectionError):  # the process's own loop reports that
        warn_if_trusted(r, keys, who)


def _stop_on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


redis_url_option = click.option(
    "--redis-url", envvar="CLOUDQ_REDIS_URL", help="Redis URL (env CLOUDQ_REDIS_URL).", show_envvar=True
)
prefix_option = click.option(
    "--prefix",
    envvar="CLOUDQ_PREFIX",
    default="cloudq:",
    show_default=True,
    help="Key prefix (env CLOUDQ_PREFIX).",
)


def _read_password(stdin: bool, confirm: bool = True) -> str:
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=confirm)


def gateway_listen_options(host_help: str, port_help: str | None = None) -> Callable[[Any], Any]:
    """``--host`` and ``--port`` of the browser gateway (``cloudq gateway``, ``cloudq demo``)."""

    def deco(f: Any) -> Any:
        f = click.option(
            "--port",
            envvar="CLOUDQ_GATEWAY_PORT",
            type=click.IntRange(0, 65535),
            default=8080,
            show_default=True,
            show_envvar=True,
            help=port_help,
        )(f)
        return click.option(
            "--host",
            envvar="CLOUDQ_GATEWAY_HOST",
            default="127.0.0.1",
            show_default=True,
            show_envvar=True,
            help=host_help,
        )(f)

    return deco
