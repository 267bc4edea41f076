"""The ``cloudq`` command. Thin: parse options, build objects, call library code.

Every option can also be set from a ``CLOUDQ_…`` environment variable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import click
import redis

from cloudq.cli_common import (
    _connect,
    _fail,
    _read_password,
    _setup_logging,
    _stop_on_signals,
    _warn_if_trusted,
    prefix_option,
    redis_url_option,
)
from cloudq.keys import Keys
from cloudq.settings import Settings

log = logging.getLogger("cloudq")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="cloudq")
def main(verbose: int) -> None:
    """cloudq: time-shared cloud-streamed interactive sessions over Redis."""
    _setup_logging(verbose)


# -- central ---------------------------------------------------------------------------------
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
    names = Settings.__dataclass_fields__.keys()
    return Settings(**{k: kw.pop(k) for k in list(kw) if k in names})


@main.command()
@redis_url_option
@prefix_option
@central_options
@click.option("--no-notifications", is_flag=True, help="Do not use keyspace notifications at all.")
@click.option(
    "--no-acl",
    is_flag=True,
    envvar="CLOUDQ_NO_ACL",
    show_envvar=True,
    help="Create no per-session Redis users: clients are trusted (logged loudly).",
)
@_cost_opt
@metrics_options
def central(
    redis_url: str | None,
    prefix: str,
    no_notifications: bool,
    no_acl: bool,
    bcrypt_cost: int,
    metrics_port: int,
    metrics_addr: str,
    **kw: Any,
) -> None:
    """Run a central server (any number of replicas may run)."""
    from cloudq.central import Central
    from cloudq.metrics import CentralMetrics

    try:
        settings = settings_from(kw)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    r = _connect(redis_url)
    c = Central(
        r,
        Keys(prefix),
        settings,
        notifications=not no_notifications,
        use_acl=not no_acl,
        bcrypt_cost=bcrypt_cost,
    )
    _serve_metrics(metrics_port, metrics_addr, CentralMetrics(r, Keys(prefix), c.counters).registry)
    done = threading.Event()
    _stop_on_signals(done.set)
    try:
        c.start()
    except redis.ConnectionError as exc:
        _fail(f"cannot reach Redis: {exc}", 5)
    while not done.wait(1.0):
        pass
    c.shutdown()


# -- node and worker -------------------------------------------------------------------------
def _size(ctx: Any, param: Any, value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT, got {value!r}") from None
    return w, h


@main.group(invoke_without_command=True)
@redis_url_option
@prefix_option
@click.option(
    "--id", "node_id", envvar="CLOUDQ_NODE_ID", help="Node id, unique in the pool (required to run)."
)
@click.option(
    "--host", envvar="CLOUDQ_HOST", default=socket.gethostname, help="Host name (its worker queue)."
)
@click.option(
    "--app",
    envvar="CLOUDQ_APP",
    default="paint",
    show_default=True,
    help="App to run: paint, probe, package.module:Class, or x11:COMMAND (a real X11 program, "
    "e.g. x11:xterm or x11:'xclock -update 1').",
)
@click.option(
    "--display",
    envvar="CLOUDQ_DISPLAY",
    default=None,
    help="x11 apps: run on this existing X display (e.g. :0) instead of starting Xvfb.",
)
@click.option(
    "--freeze/--no-freeze",
    envvar="CLOUDQ_FREEZE",
    default=False,
    show_default=True,
    help="Asleep, stop the app's program (SIGSTOP of its process group; SIGCONT on wake).",
)
@click.option(
    "--size", envvar="CLOUDQ_SIZE", default="1280x720", show_default=True, callback=_size, help="WxH."
)
@click.option("--fps", envvar="CLOUDQ_FPS", type=click.FloatRange(1, 240), default=30.0, show_default=True)
@click.option(
    "--bitrate",
    envvar="CLOUDQ_BITRATE",
    type=click.IntRange(min=10_000),
    default=2_000_000,
    show_default=True,
    help="Bits per second.",
)
@click.option("--preset", envvar="CLOUDQ_PRESET", default="ultrafast", show_default=True, help="x264 preset.")
@click.option(
    "--gop",
    envvar="CLOUDQ_GOP",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between periodic keyframes.",
)
@click.option(
    "--workspace",
    envvar="CLOUDQ_WORKSPACE",
    default=None,
    help="Root of the nodes' user-data workspaces (default <tmp>/cloudq-workspace).",
)
@click.option(
    "--always-encode",
    envvar="CLOUDQ_ALWAYS_ENCODE",
    is_flag=True,
    help="Encode every frame tick even when nothing changed (the baseline `bench cost` compares with).",
)
@click.option(
    "--store",
    envvar="CLOUDQ_STORE",
    default=None,
    help="User-data store (a node saves its session there if it was declared offline).",
)
@metrics_options
@click.pass_context
def node(
    ctx: click.Context,
    redis_url: str | None,
    prefix: str,
    node_id: str | None,
    host: str,
    app: str,
    display: str | None,
    freeze: bool,
    size: tuple[int, int],
    fps: float,
    bitrate: int,
    preset: str,
    gop: float,
    workspace: str | None,
    always_encode: bool,
    metrics_port: int,
    metrics_addr: str,
    store: str | None,
) -> None:
    """Run one service node (`cloudq node --id ID ...`), or manage nodes (`cloudq node drain ID`,
    `cloudq node forget ID`)."""
    if ctx.invoked_subcommand is not None:
        return
    if not node_id:
        raise click.UsageError("--id is required to run a node")
    from cloudq.workers.metrics import NodeMetrics
    from cloudq.workers.node import MediaConfig, Node, NodeIdTaken, default_workspace

    if store:
        os.environ["CLOUDQ_STORE"] = store

    try:
        media = MediaConfig(
            width=size[0],
            height=size[1],
            fps=fps,
            bitrate=bitrate,
            preset=preset,
            gop=gop,
            workspace=workspace or default_workspace(),
            always_encode=always_encode,
        )
        metrics = NodeMetrics(node_id)
        r = _connect(redis_url)
        n = Node(
            r,
            Keys(prefix),
            node_id,
            host=host,
            app=app,
            media=media,
            display=display,
            freeze=freeze,
            observer=metrics,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _serve_metrics(metrics_port, metrics_addr, metrics.attach(n).registry)
    _stop_on_signals(lambda: (n.stop.set(), n.interrupt()))
    try:
        _warn_if_trusted(r, Keys(prefix), f"node {node_id}")
        n.run()
    except NodeIdTaken as exc:
        _fail(str(exc), 3)
    except redis.ConnectionError as exc:
        _fail(f"cannot reach Redis: {exc}", 5)


@node.command("forget")
@redis_url_option
@prefix_option
@click.argument("node_id", metavar="ID")
def node_forget(redis_url: str | None, prefix: str, node_id: str) -> None:
    """Forget an offline node now (its hash, control stream and pool entry)."""
    from cloudq.state import StateMachine

    r = _connect(redis_url)
    try:
        status = StateMachine(r, Keys(prefix)).forget_node(node_id)
    except redis.ConnectionError as exc:
        _fail(f"cannot reach Redis: {exc}", 5)
    if status != "forgotten":
        why = {
            "unknown": "no such node",
            "alive": "it is alive (stop it first)",
            "not-offline": "it is not offline (stop it first)",
        }
        _fail(f"node {node_id} not forgotten: {why.get(status, status)}")
    click.echo(f"forgot node {node_id}")


@main.command()
@redis_url_option
@prefix_option
@click.option("--host", envvar="CLOUDQ_HOST", default=socket.gethostname, help="Serve this host's queue.")
@click.option("--name", default=None, help="Worker name (default: RQ's).")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
@click.option(
    "--store", envvar="CLOUDQ_STORE", default=None, help="User-data store directory (shared by hosts)."
)
@click.option("--workspace", envvar="CLOUDQ_WORKSPACE", default=None, help="This host's node workspaces.")
@click.option(
    "--quota-mib", envvar="CLOUDQ_QUOTA_MIB", type=click.FloatRange(min=0), default=100, show_default=True
)
@metrics_options
def worker(
    redis_url: str | None,
    prefix: str,
    host: str,
    name: str | None,
    burst: bool,
    store: str | None,
    workspace: str | None,
    quota_mib: float,
    metrics_port: int,
    metrics_addr: str,
) -> None:
    """Run an RQ worker for this host's jobs (mount, save, close)."""
    from cloudq.workers.metrics import JobMetrics
    from cloudq.workers.worker import run_worker

    # the jobs (in forked work horses) read these
    for var, value in (
        ("CLOUDQ_STORE", store),
        ("CLOUDQ_WORKSPACE", workspace),
        ("CLOUDQ_QUOTA_MIB", quota_mib),
    ):
        if value is not None:
            os.environ[var] = str(value)
    r = _connect(redis_url)
    _warn_if_trusted(r, Keys(prefix), "worker")
    metrics = JobMetrics()
    _serve_metrics(metrics_port, metrics_addr, metrics.registry)
    run_worker(r, Keys(prefix), host, name=name, burst=burst, metrics=metrics)


# -- users -----------------------------------------------------------------------------------
@main.group()
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
    from cloudq.auth import AuthError, Users

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
    from cloudq.auth import AuthError, Users

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
    from cloudq.auth import AuthError, Users
    from cloudq.cli_data import purge_user

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
    from cloudq.auth import Users

    rows = Users(_connect(redis_url), Keys(prefix)).list()
    if as_json:
        click.echo(json.dumps(rows))
        return
    for u in rows:
        flags = " ".join(
            f for f, on in (("locked", u["locked"] == "1"), ("disabled", u["disabled"] == "1")) if on
        )
        click.echo(f"{u['user']:<20} session={u['session'] or '-'} {flags}".rstrip())


# -- status ----------------------------------------------------------------------------------
@main.command()
@redis_url_option
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Redraw a live table (with per-node fps and CPU) until Ctrl-C.")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="With --watch."
)
@click.option("--count", type=click.IntRange(min=0), default=0, help="With --watch: stop after N tables.")
def status(
    redis_url: str | None, prefix: str, as_json: bool, watch: bool, interval: float, count: int
) -> None:
    """Show nodes, sessions and the queue."""
    from cloudq.status import format_text, gather
    from cloudq.status import watch as watch_loop

    try:
        if watch:
            with contextlib.suppress(KeyboardInterrupt):
                watch_loop(
                    _connect(redis_url),
                    Keys(prefix),
                    lambda text: click.echo(text, nl=False),
                    interval,
                    count,
                    clear=sys.stdout.isatty(),
                )
            return
        st = gather(_connect(redis_url), Keys(prefix))
    except redis.ConnectionError as exc:
        _fail(f"cannot reach Redis: {exc}", 5)
    click.echo(json.dumps(st, indent=2) if as_json else format_text(st))


# -- everything on one machine ---------------------------------------------------------------
@main.command()
@redis_url_option
@prefix_option
@click.option(
    "--nodes", type=click.IntRange(min=0), default=2, show_default=True, help="Service nodes to start."
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="RQ workers to start."
)
@click.option("--app", default="paint", show_default=True)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=0,
    help="Stop after this many seconds (0 = until Ctrl-C).",
)
@click.option(
    "--data-dir",
    envvar="CLOUDQ_DATA_DIR",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep everything here (embedded server with AOF everysec, user-data store, workspaces), "
    "so it survives a restart. Without it everything is temporary.",
)
@click.option(
    "--no-acl",
    is_flag=True,
    envvar="CLOUDQ_NO_ACL",
    show_envvar=True,
    help="Run without Redis ACL users: clients are trusted (logged loudly).",
)
@central_options
def up(
    redis_url: str | None,
    prefix: str,
    nodes: int,
    workers: int,
    app: str,
    duration: float,
    data_dir: str | None,
    no_acl: bool,
    **kw: Any,
) -> None:
    """Run everything on this machine: embedded Redis (unless --redis-url), central, nodes, workers."""
    from cloudq.up import Cluster

    try:
        settings = settings_from(kw)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    done = threading.Event()
    _stop_on_signals(done.set)
    cluster = Cluster(
        redis_url,
        prefix,
        nodes=nodes,
        workers=workers,
        app=app,
        settings=settings,
        data_dir=data_dir,
        use_acl=not no_acl,
    )
    with cluster as cl:
        click.echo(f"cloudq is up: CLOUDQ_REDIS_URL={cl.redis_url}")
        if data_dir:
            click.echo(f"  everything is kept in {os.path.abspath(data_dir)} (survives a restart)")
        elif cl.server is not None:
            click.echo(
                "  everything is TEMPORARY: users, sessions and saved data are gone when this stops "
                "(use --data-dir DIR to keep them)"
            )
        click.echo(f"  redis-cli -u {cl.redis_url} keys '{prefix}*'")
        click.echo(f"  CLOUDQ_REDIS_URL={cl.redis_url} cloudq status")
        if cl.client_url != cl.redis_url:
            click.echo(f"  clients: CLOUDQ_REDIS_URL={cl.client_url} cloudq connect --user NAME")
        sys.stdout.flush()
        done.wait(duration or None)
        click.echo("stopping ...")


# -- ACL ------------------------------------------------------------------------------------
@main.group("acl")
def acl_group() -> None:
    """Redis ACL users (see the Security section of README)."""


def _role_password_options(f: Callable[..., Any]) -> Callable[..., Any]:
    from cloudq.acl import ROLES

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


@acl_group.command("print")
@prefix_option
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None, help="Write to FILE.")
@_role_password_options
def acl_print(prefix: str, out: str | None, **pw: str | None) -> None:
    """Write the ACL file for this prefix (role users, login user, default user)."""
    from cloudq.acl import ROLES, Passwords, acl_file

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


def _register_subcommands() -> None:
    from cloudq.bench.cli import bench
    from cloudq.cli_admin import node_drain, node_undrain, session, user_disable, user_enable
    from cloudq.cli_client import connect, gateway
    from cloudq.cli_data import data
    from cloudq.cli_demo import demo

    main.add_command(demo)
    main.add_command(connect)
    main.add_command(gateway)
    main.add_command(data)
    main.add_command(bench)
    main.add_command(session)
    node.add_command(node_drain)
    node.add_command(node_undrain)
    user.add_command(user_disable)
    user.add_command(user_enable)


_register_subcommands()


if __name__ == "__main__":
    main()
