"""``cloudq node``: run a service node; ``node forget|drain|undrain``: operator actions on one."""

from __future__ import annotations

import os
import socket

import click
import redis

from cloudq.cli.common import (
    _connect,
    _fail,
    _machine,
    _run,
    _serve_metrics,
    _stop_on_signals,
    _warn_if_trusted,
    metrics_options,
    operator,
    parse_wxh,
    prefix_option,
    redis_url_option,
    why_option,
)
from cloudq.keys import Keys


@click.group(invoke_without_command=True)
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
    help="Asleep, stop the app's program (its sandbox's cgroup freezer, else SIGSTOP; thawed on wake).",
)
@click.option(
    "--size", envvar="CLOUDQ_SIZE", default="1280x720", show_default=True, callback=parse_wxh, help="WxH."
)
@click.option(
    "--max-size",
    envvar="CLOUDQ_MAX_SIZE",
    default="1920x1200",
    show_default=True,
    callback=parse_wxh,
    help="WxH: x11 apps: the largest a client's window may make the picture (the display is "
    "resized with RandR, clamped to this; at least --size). Built-in apps keep --size.",
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
    help="Convert and encode every frame tick in full even when nothing changed, as a conventional "
    "streamer does (the baseline `bench cost` compares with).",
)
@click.option(
    "--store",
    envvar="CLOUDQ_STORE",
    default=None,
    help="User-data store (a node saves its session there if it was declared offline).",
)
@click.option(
    "--unconfined",
    envvar="CLOUDQ_UNCONFINED",
    is_flag=True,
    help="x11 apps: run the program as the node's own user, without its sandbox (a WARNING at "
    "each session's start). Only for hosts that cannot build the sandbox and trust their users.",
)
@click.option(
    "--program-network",
    envvar="CLOUDQ_PROGRAM_NETWORK",
    type=click.Choice(["none", "host"]),
    default="none",
    show_default=True,
    help="x11 apps: none = the program's own network namespace, loopback only; host = the host's "
    "network (the program reaches Redis and every service of the host: a WARNING at start).",
)
@click.option(
    "--program-memory",
    envvar="CLOUDQ_PROGRAM_MEMORY",
    default="2G",
    show_default=True,
    help="x11 apps: memory limit of the program's sandbox (cgroup); hitting it ends the session "
    "(app_crashed: memory limit).",
)
@click.option(
    "--program-pids",
    envvar="CLOUDQ_PROGRAM_PIDS",
    type=click.IntRange(min=8),
    default=512,
    show_default=True,
    help="x11 apps: processes and threads of the program's sandbox; hitting it ends the session "
    "(app_crashed: pids limit).",
)
@click.option(
    "--program-files",
    envvar="CLOUDQ_PROGRAM_FILES",
    type=click.IntRange(min=16),
    default=1024,
    show_default=True,
    help="x11 apps: open files per process of the program (RLIMIT_NOFILE).",
)
@click.option(
    "--program-bind",
    envvar="CLOUDQ_PROGRAM_BIND",
    multiple=True,
    help="x11 apps: a path the program may read (bound read-only at the same path in its "
    "sandbox), e.g. a virtualenv outside /usr; repeatable.",
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
    max_size: tuple[int, int],
    fps: float,
    bitrate: int,
    preset: str,
    gop: float,
    workspace: str | None,
    always_encode: bool,
    metrics_port: int,
    metrics_addr: str,
    store: str | None,
    unconfined: bool,
    program_network: str,
    program_memory: str,
    program_pids: int,
    program_files: int,
    program_bind: tuple[str, ...],
) -> None:
    """Run one service node (`cloudq node --id ID ...`), or manage nodes (`cloudq node drain ID`,
    `cloudq node forget ID`)."""
    if ctx.invoked_subcommand is not None:
        return
    if not node_id:
        raise click.UsageError("--id is required to run a node")
    from cloudq.workers.metrics import NodeMetrics
    from cloudq.workers.node import MediaConfig, Node, NodeFailed, NodeIdTaken, default_workspace

    if store:
        os.environ["CLOUDQ_STORE"] = store

    try:
        sandbox = None
        if app.strip().startswith("x11:"):  # python-xlib and mss only for real programs
            from cloudq.workers.apps.x11.sandbox import SandboxConfig, parse_size

            sandbox = SandboxConfig(
                confined=not unconfined,
                network=program_network,
                memory=parse_size(program_memory),
                pids=program_pids,
                nofile=program_files,
                binds=tuple(os.path.abspath(b) for b in program_bind),
            )
        media = MediaConfig(
            width=size[0],
            height=size[1],
            fps=fps,
            bitrate=bitrate,
            preset=preset,
            gop=gop,
            workspace=workspace or default_workspace(),
            always_encode=always_encode,
            max_width=max(size[0], max_size[0] - max_size[0] % 2),
            max_height=max(size[1], max_size[1] - max_size[1] % 2),
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
            sandbox=sandbox,
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
    except NodeFailed as exc:
        _fail(str(exc), 1)
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


def _drain(node_id: str, on: bool, redis_url: str | None, prefix: str, reason: str) -> None:
    sm = _machine(redis_url, prefix)
    if not _run(sm.drain, node_id, on, operator(), reason):
        _fail(f"no node {node_id!r}")


@node.command("drain")
@redis_url_option
@prefix_option
@why_option
@click.argument("node_id")
def node_drain(redis_url: str | None, prefix: str, reason: str, node_id: str) -> None:
    """Take NODE_ID out of rotation: its session goes on, it takes no new one, it leaves the pool."""
    _drain(node_id, True, redis_url, prefix, reason)
    click.echo(f"node {node_id} drained: it takes no new session")


@node.command("undrain")
@redis_url_option
@prefix_option
@why_option
@click.argument("node_id")
def node_undrain(redis_url: str | None, prefix: str, reason: str, node_id: str) -> None:
    """Put NODE_ID back into rotation."""
    _drain(node_id, False, redis_url, prefix, reason)
    click.echo(f"node {node_id} back in rotation")
