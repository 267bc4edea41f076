"""``cloudq connect`` (the Python client) and ``cloudq gateway`` (the browser client, run
server-side): CLI wiring of the client role, imported only when one of them runs."""

from __future__ import annotations

import logging
import threading

import click

from cloudq.cli.common import (
    _connect,
    _fail,
    _read_password,
    _stop_on_signals,
    gateway_listen_options,
    metrics_options,
    prefix_option,
    redis_url_option,
)
from cloudq.keys import Keys

log = logging.getLogger("cloudq")

# -- client ----------------------------------------------------------------------------------
CONNECT_HELP = """Connect to a session as USER.

Logs in (the password is asked for, or read with --password-stdin / --password-file, never
taken from the command line), waits in the queue if every node is busy (showing the position),
then shows the session in a window, or without one with --headless (the default when there is
no display). It runs until the window is closed, Ctrl-C, --duration passes or the server
closes the session, and logs out at the end.

If Redis stops answering, the client retries with exponential backoff and jitter for up to the
server's reconnect grace, then logs in again with the password it holds in memory and lands on
the same session and node. If the session moves to another node, the client follows.

\b
Script (--script FILE): one event per line, seconds since the stream started, then
  key K | mouse_down X Y | mouse_move X Y | mouse_up X Y      (# comments, blank lines ok)
  e.g.  0.5 key 4      1.0 mouse_down 100 200      1.2 mouse_up 300 200

\b
Exit codes:
  0  the session ended normally (duration reached, window closed or interrupted)
  1  other error
  2  bad usage: a malformed --script (the message names the line), a bad option
  3  invalid credentials
  4  account locked or disabled
  5  server not reachable / no central server answered / lost and not back in time
  6  the session was closed by the server (the message says why)
  7  the video stream is unusable: entries kept arriving for --stream-timeout
     seconds without one decodable frame
"""


@click.command(help=CONNECT_HELP)
@redis_url_option
@prefix_option
@click.option("--user", "user_name", required=True, envvar="CLOUDQ_USER")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, exists=True),
    help="Read the password from the first line of a file.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=0,
    help="Leave after this many seconds (0 = run until closed or interrupted).",
)
@click.option(
    "--queue-wait",
    type=click.FloatRange(min=0),
    default=0,
    help="Give up waiting in the queue after this many seconds (0 = wait forever).",
)
@click.option(
    "--headless",
    is_flag=True,
    envvar="CLOUDQ_HEADLESS",
    help="No window (env CLOUDQ_HEADLESS). Without a display this is automatic.",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False, writable=True),
    help="Record the received video into this MP4 file (remuxed, not re-encoded).",
)
@click.option(
    "--snapshot",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the last decoded frame to this PNG file at exit.",
)
@click.option(
    "--script",
    "script_file",
    type=click.Path(dir_okay=False),
    help="Send the timed input events in this file (format above).",
)
@click.option(
    "--stats-json",
    type=click.Path(dir_okay=False, writable=True),
    help="Write what the session saw (frames, keyframes, gaps, input latencies, states, "
    "reconnects, close reason) to this JSON file, every second and at exit.",
)
@click.option(
    "--stream-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Exit 7 when video entries arrive this long without a decodable frame (0 = never).",
)
@click.option(
    "--socket-timeout",
    type=click.FloatRange(min=0.5),
    default=3.0,
    show_default=True,
    envvar="CLOUDQ_SOCKET_TIMEOUT",
    help="A Redis reply slower than this counts as a lost connection (then the client reconnects).",
)
@click.option(
    "--upload",
    "uploads",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Upload this file into the session's ~/Uploads once attached (repeatable).",
)
@click.option(
    "--download",
    "downloads",
    multiple=True,
    help="Download this file of the session's HOME (e.g. Downloads/report.pdf) into the current "
    "directory once attached (repeatable).",
)
def connect(
    redis_url: str | None,
    prefix: str,
    user_name: str,
    password_stdin: bool,
    password_file: str | None,
    duration: float,
    queue_wait: float,
    headless: bool,
    record: str | None,
    snapshot: str | None,
    script_file: str | None,
    stats_json: str | None,
    stream_timeout: float,
    socket_timeout: float,
    uploads: tuple[str, ...],
    downloads: tuple[str, ...],
) -> None:
    from cloudq.client.launcher import ClientError
    from cloudq.client.script import ScriptError, load_script
    from cloudq.client.session import ClientSession, ConnectOptions, client_redis

    script = []
    if script_file:
        try:
            script = load_script(script_file)
        except ScriptError as exc:
            _fail(str(exc), 2)
    if not redis_url:
        _connect(redis_url)  # the usage error
    viewer_missing = None
    if not headless:
        from cloudq.client.viewer import unavailable

        viewer_missing = unavailable()
    if password_file:
        with open(password_file) as fh:
            password = fh.readline().rstrip("\r\n")
    else:
        password = _read_password(password_stdin, confirm=False)
    if viewer_missing:
        log.info("no window: %s; running headless", viewer_missing)
    stop = threading.Event()
    _stop_on_signals(stop.set)
    opt = ConnectOptions(
        duration=duration,
        queue_wait=queue_wait or None,
        record=record,
        snapshot=snapshot,
        script=script,
        stats_json=stats_json,
        stream_timeout=stream_timeout,
        uploads=list(uploads),
        downloads=list(downloads),
    )
    session = ClientSession(
        client_redis(redis_url, socket_timeout),
        Keys(prefix),
        user_name,
        password,
        opt,
        stop,
        say=lambda m: click.echo(m, err=True),
    )
    try:
        if headless or viewer_missing:
            reason = session.run()
        else:
            from cloudq.client.viewer import NoWindow, Viewer

            try:
                reason = Viewer(session, title=f"cloudq: {user_name}").run()
            except NoWindow as exc:
                click.echo(f"cloudq: {exc}; running headless", err=True)
                reason = session.run()
    except ClientError as exc:
        _fail(str(exc), exc.exit_code)
    click.echo(reason, err=True)


# -- the browser gateway ---------------------------------------------------------------------
@click.command()
@redis_url_option
@prefix_option
@gateway_listen_options(
    "Listen on this address (put a TLS reverse proxy in front for anything but localhost)."
)
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    envvar="CLOUDQ_GATEWAY_ALLOW_ORIGIN",
    show_envvar=True,
    help="Also accept WebSockets from this Origin (e.g. https://cloudq.example); repeatable. "
    "By default only the gateway's own host is accepted.",
)
@click.option(
    "--secure-cookie",
    is_flag=True,
    envvar="CLOUDQ_GATEWAY_SECURE_COOKIE",
    show_envvar=True,
    help="Mark the token cookie Secure (set this behind a TLS proxy).",
)
@click.option(
    "--session-rights",
    type=click.Choice(["auto", "session", "gateway"]),
    default="auto",
    envvar="CLOUDQ_GATEWAY_SESSION_RIGHTS",
    show_default=True,
    show_envvar=True,
    help="Per-browser Redis connection: the session's ACL user (session), the gateway's own "
    "credentials (gateway), or the session user when the server has it (auto).",
)
@click.option(
    "--max-per-address",
    type=click.IntRange(min=0),
    default=64,
    envvar="CLOUDQ_GATEWAY_MAX_PER_ADDRESS",
    show_default=True,
    show_envvar=True,
    help="Open connections one client address may hold; more are answered 429 (0 = no cap; behind "
    "a reverse proxy, cap at the proxy and set 0).",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    envvar="CLOUDQ_GATEWAY_HEADER_TIMEOUT",
    show_default=True,
    show_envvar=True,
    help="Seconds a connection has to send each complete request head, idle keep-alive time "
    "included; then 408 and closed (0 = off).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    envvar="CLOUDQ_GATEWAY_BODY_TIMEOUT",
    show_default=True,
    show_envvar=True,
    help="Seconds a login request has to send its body (0 = off).",
)
@click.option(
    "--close-timeout",
    type=click.FloatRange(min=0),
    default=1.0,
    envvar="CLOUDQ_GATEWAY_CLOSE_TIMEOUT",
    show_default=True,
    show_envvar=True,
    help="Seconds a WebSocket the gateway closes waits for the page's close frame.",
)
@click.option(
    "--ws-ping",
    type=click.FloatRange(min=0),
    default=10.0,
    envvar="CLOUDQ_GATEWAY_WS_PING",
    show_default=True,
    show_envvar=True,
    help="Ping each WebSocket this often; one that does not answer within half of it is closed (0 = off).",
)
@click.option(
    "--admin-port",
    type=click.IntRange(min=0, max=65535),
    default=0,
    envvar="CLOUDQ_GATEWAY_ADMIN_PORT",
    show_default=True,
    show_envvar=True,
    help="Serve /stats and /healthz without a login on this port (0 = off; on the public port "
    "/stats needs a login).",
)
@click.option(
    "--admin-addr",
    default="127.0.0.1",
    envvar="CLOUDQ_GATEWAY_ADMIN_ADDR",
    show_default=True,
    show_envvar=True,
    help="Address of the admin port (keep it private).",
)
@metrics_options
def gateway(
    redis_url: str | None,
    prefix: str,
    host: str,
    port: int,
    allow_origins: tuple[str, ...],
    secure_cookie: bool,
    session_rights: str,
    max_per_address: int,
    header_timeout: float,
    body_timeout: float,
    close_timeout: float,
    ws_ping: float,
    admin_port: int,
    admin_addr: str,
    metrics_port: int,
    metrics_addr: str,
) -> None:
    """Serve the browser client: login page, video over WebSockets, input back."""
    from cloudq.client.web.http import Config, serve

    if not redis_url:
        _connect(redis_url)  # the usage error
    assert redis_url is not None
    cfg = Config(
        redis_url=redis_url,
        prefix=prefix,
        allow_origins=frozenset(o.lower().rstrip("/") for o in allow_origins),
        secure_cookie=secure_cookie,
        session_rights=session_rights,
        max_per_address=max_per_address,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        close_timeout=close_timeout,
        ws_ping=ws_ping,
    )
    try:
        serve(cfg, host, port, metrics_port, metrics_addr, admin_port, admin_addr)
    except OSError as exc:
        _fail(f"cannot serve on {host}:{port} (or metrics on {metrics_addr}:{metrics_port}): {exc}", 1)
