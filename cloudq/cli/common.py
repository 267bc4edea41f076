"""What every ``cloudq`` command module shares: the Redis connection of a server-side process,
the common options, failing with a clear message and exit code, signal handling."""

from __future__ import annotations

import contextlib
import functools
import getpass
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
import redis

from cloudq.connection import connect
from cloudq.keys import Keys
from cloudq.settings import Settings
from cloudq.state import StateMachine

DEFAULT_SOCKET_TIMEOUT = 10.0
"""Seconds a server-side Redis call may wait for an answer (env CLOUDQ_SOCKET_TIMEOUT, 0 = off)."""

"""Seconds a server-side Redis call may wait for an answer (env CLOUDQ_SOCKET_TIMEOUT, 0 = off)."""


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")


def _connect(url: str | None) -> redis.Redis:
    if not url:
        raise click.UsageError(
            "no Redis given: pass --redis-url-file or --redis-url "
            "(or set CLOUDQ_REDIS_URL_FILE or CLOUDQ_REDIS_URL; or run `cloudq up`)"
        )
    # a socket timeout (longer than any blocking read we issue: <= 1 s) and health checks, so a
    # half-open TCP connection raises and is replaced instead of hanging a server process
    try:
        timeout = float(os.environ.get("CLOUDQ_SOCKET_TIMEOUT") or DEFAULT_SOCKET_TIMEOUT)
    except ValueError:
        raise click.UsageError("CLOUDQ_SOCKET_TIMEOUT must be a number of seconds (0 = off)") from None
    try:
        return connect(
            url,
            socket_connect_timeout=5,
            socket_timeout=timeout or None,
            socket_keepalive=True,
            health_check_interval=10,
        )
    except ValueError as exc:  # a malformed redis+sentinel:// URL
        raise click.UsageError(str(exc)) from None


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"cloudq: {message}", err=True)
    sys.exit(code)


def _warn_if_trusted(r: redis.Redis, keys: Keys, who: str) -> None:
    from cloudq.credentials import warn_if_trusted

    with contextlib.suppress(redis.ConnectionError):  # the process's own loop reports that
        warn_if_trusted(r, keys, who)


def _stop_on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def redis_url_from(url: str | None, url_file: str | None) -> str | None:
    """The Redis URL given as ``--redis-url``/``CLOUDQ_REDIS_URL`` or read from
    ``--redis-url-file``/``CLOUDQ_REDIS_URL_FILE`` (a file only this OS user can read: see
    :mod:`cloudq.secretfile`); both at once is a usage error. ``CLOUDQ_REDIS_URL`` is removed
    from this process's environment once read, so no child program inherits the password."""
    from cloudq.secretfile import UnsafeSecretFile, read_secret

    os.environ.pop("CLOUDQ_REDIS_URL", None)
    if url and url_file:
        ctx = click.get_current_context(silent=True)
        src = ctx.get_parameter_source("redis_url") if ctx else None
        given = "CLOUDQ_REDIS_URL" if src == click.core.ParameterSource.ENVIRONMENT else "--redis-url"
        src = ctx.get_parameter_source("redis_url_file") if ctx else None
        given_file = (
            "CLOUDQ_REDIS_URL_FILE" if src == click.core.ParameterSource.ENVIRONMENT else "--redis-url-file"
        )
        raise click.UsageError(f"give the Redis URL once: {given} and {given_file} are both set")
    if url_file:
        try:
            return read_secret(url_file)
        except UnsafeSecretFile as exc:
            raise click.UsageError(f"--redis-url-file: {exc}") from None
    return url


def redis_url_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--redis-url`` and ``--redis-url-file``: the command gets one ``redis_url`` argument."""

    @functools.wraps(f)  # keeps the options declared below this one (click's __click_params__)
    def command(
        *args: Any, redis_url: str | None = None, redis_url_file: str | None = None, **kw: Any
    ) -> Any:
        return f(*args, redis_url=redis_url_from(redis_url, redis_url_file), **kw)

    command = click.option(
        "--redis-url-file",
        envvar="CLOUDQ_REDIS_URL_FILE",
        show_envvar=True,
        type=click.Path(dir_okay=False),
        default=None,
        help="Read the Redis URL from this file, readable by nobody but this OS user (mode 0600): "
        "unlike --redis-url, it keeps the password out of the command line and the environment.",
    )(command)
    return click.option(
        "--redis-url",
        envvar="CLOUDQ_REDIS_URL",
        show_envvar=True,
        help="Redis URL. With a password prefer --redis-url-file: other processes can read a "
        "command line and the environment.",
    )(command)


prefix_option = click.option(
    "--prefix",
    envvar="CLOUDQ_PREFIX",
    default="cloudq:",
    show_default=True,
    help="Key prefix (env CLOUDQ_PREFIX).",
)


def parse_wxh(ctx: Any, param: Any, value: str) -> tuple[int, int]:
    """A click callback: ``WIDTHxHEIGHT`` as two ints."""
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT, got {value!r}") from None
    return w, h


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


# -- the central server's clocks and the metrics port (central, up, node, worker) ----------
_cost_opt = click.option(
    "--bcrypt-cost",
    type=click.IntRange(4, 31),
    default=12,
    envvar="CLOUDQ_BCRYPT_COST",
    show_default=True,
    show_envvar=True,
    help="bcrypt cost of password hashes (central: also of the dummy hash checked for unknown users).",
)


def _clock(name: str, default: float, help_: str) -> Callable[[Any], Any]:
    env = "CLOUDQ_" + name.upper().replace("-", "_")
    return click.option(
        f"--{name}",
        type=click.FloatRange(min=0),
        default=default,
        envvar=env,
        show_default=True,
        show_envvar=True,
        help=f"{help_} Seconds; 0 = off.",
    )


def central_options(f: Callable[..., Any]) -> Callable[..., Any]:
    d = Settings()
    for opt in reversed(
        [
            _clock("heartbeat-interval", d.heartbeat_interval, "How often clients beat."),
            _clock("heartbeat-ttl", d.heartbeat_ttl, "Heartbeat lapses after this."),
            _clock("idle-timeout", d.idle_timeout, "No input for this long: the node sleeps."),
            _clock("grace", d.grace, "Reconnect grace after the client is gone."),
            _clock("idle-close", d.idle_close, "Idle this long: the session closes."),
            _clock("max-session", d.max_session, "Longest session."),
            _clock("max-warning", d.max_warning, "Warn this long before max-session."),
            _clock("node-ttl", d.node_ttl, "A node is offline when its liveness is this old."),
            _clock("token-ttl", d.token_ttl, "Bearer token lifetime."),
            _clock("job-lease", d.job_lease, "Re-issue a mount/close job not done after this."),
            _clock("autosave", d.autosave, "Save an active session's data this often (when changed)."),
            _clock(
                "node-forget", d.node_forget, "Forget a node offline for this long (`cloudq node forget`)."
            ),
            click.option(
                "--lockout-limit",
                type=click.IntRange(min=0),
                default=d.lockout_limit,
                envvar="CLOUDQ_LOCKOUT_LIMIT",
                show_default=True,
                help="Failed logins before lockout; 0 = off.",
            ),
            _clock("lockout-window", d.lockout_window, "Window in which failures count."),
            _clock("lockout-time", d.lockout_time, "How long an account stays locked."),
            click.option(
                "--file-limit",
                type=click.IntRange(min=0),
                default=d.file_limit,
                envvar="CLOUDQ_FILE_LIMIT",
                show_default=True,
                help="Largest file uploaded into or downloaded from a session's HOME, bytes; 0 = off.",
            ),
        ]
    ):
        f = opt(f)
    return f


def metrics_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--metrics-port`` (0 = off) and ``--metrics-addr``: Prometheus metrics of this process."""
    f = click.option(
        "--metrics-addr",
        envvar="CLOUDQ_METRICS_ADDR",
        default="0.0.0.0",
        show_default=True,
        help="Address the metrics server binds.",
    )(f)
    return click.option(
        "--metrics-port",
        envvar="CLOUDQ_METRICS_PORT",
        type=click.IntRange(0, 65535),
        default=0,
        show_default=True,
        help="Serve Prometheus metrics on this port (0 = off).",
    )(f)


def _serve_metrics(port: int, addr: str, registry: Any) -> Callable[[], None] | None:
    from cloudq.metrics import serve

    try:
        return serve(port, registry, addr)
    except OSError as exc:
        _fail(f"cannot serve metrics on {addr}:{port}: {exc}", 1)
        return None


def settings_from(kw: dict[str, Any]) -> Settings:
    """The clock options out of ``kw`` (they are removed from it) as ``Settings``; a bad
    combination is a usage error."""
    names = Settings.__dataclass_fields__.keys()
    try:
        return Settings(**{k: kw.pop(k) for k in list(kw) if k in names})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


# -- operator commands (each one transition script that records who and why) ---------------
why_option = click.option("--reason", default="", help="Why (recorded in the events stream).")


def operator() -> str:
    """Who runs this command, for the events stream."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _machine(redis_url: str | None, prefix: str) -> StateMachine:
    if not redis_url:
        raise click.UsageError(
            "no Redis given: pass --redis-url-file or --redis-url (or set CLOUDQ_REDIS_URL_FILE or CLOUDQ_REDIS_URL)"
        )
    try:
        r = connect(redis_url, socket_connect_timeout=5, socket_timeout=10)
    except ValueError as exc:  # a malformed URL (redis+sentinel:// included)
        raise click.UsageError(str(exc)) from None
    return StateMachine(r, Keys(prefix))


def _run(fn, *args: object):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except redis.ConnectionError as exc:
        _fail(f"cannot reach Redis: {exc}", 5)
