"""``cloudq up``: everything on this machine (embedded Redis unless --redis-url)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import click

from cloudq.cli.common import (
    _stop_on_signals,
    central_options,
    prefix_option,
    redis_url_option,
    settings_from,
)


@click.command()
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
    "--maxmemory",
    envvar="CLOUDQ_MAXMEMORY",
    show_envvar=True,
    default=None,
    metavar="SIZE",
    help="The embedded server's memory limit (e.g. 512mb, 2gb; 0 = none). Default: sized for one "
    'session per node, 320 MiB + 16 MiB per node (README "Memory"). A full server refuses '
    "writes (noeviction), it never drops a session's keys.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Embedded replicas of the server (with --sentinels: Sentinel failover; README 'Failover').",
)
@click.option(
    "--sentinels",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Embedded Sentinels watching the server; every process gets a redis+sentinel:// URL.",
)
@click.option(
    "--sentinel-down-after",
    type=click.IntRange(min=100),
    default=1000,
    show_default=True,
    metavar="MS",
    help="Sentinel down-after-milliseconds: how long the primary may not answer before a failover "
    "starts (shorter than 1000 is no faster and makes the Sentinels misjudge the new primary).",
)
@click.option(
    "--media-servers",
    type=click.IntRange(0, 64),
    default=0,
    show_default=True,
    help="Embedded media servers: sessions' streams (video, input, audio, files) are spread over "
    "them, the control plane stays on the main server (README 'Media servers').",
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
    maxmemory: str | None,
    replicas: int,
    sentinels: int,
    sentinel_down_after: int,
    media_servers: int,
    **kw: Any,
) -> None:
    """Run everything on this machine: embedded Redis (unless --redis-url), central, nodes, workers."""
    from cloudq.embedded import parse_memory
    from cloudq.local.cluster import Cluster

    settings = settings_from(kw)
    limit = None
    if maxmemory is not None:
        if redis_url:
            raise click.UsageError("--maxmemory sizes the embedded server: set maxmemory on your own Redis")
        try:
            limit = parse_memory(maxmemory)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--maxmemory") from None
    if (replicas or sentinels) and (redis_url or no_acl or not (replicas and sentinels) or data_dir):
        raise click.UsageError(
            "--replicas and --sentinels go together (at least one of each), on the embedded server, "
            "with ACLs, without --data-dir"
        )
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
        maxmemory=limit,
        replicas=replicas,
        sentinels=sentinels,
        sentinel_down_after_ms=sentinel_down_after,
        media_servers=media_servers,
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
        if cl.ha is not None:
            click.echo(
                f"  {replicas} replica(s) and {sentinels} Sentinel(s): kill the primary (pid "
                f"{cl.ha.primary.proc.pid if cl.ha.primary and cl.ha.primary.proc else '?'}) and everything fails over"
            )
        for m in cl.media:
            click.echo(f"  media server {m.url} (pid {m.proc.pid if m.proc else '?'})")
        if cl.server is not None and cl.maxmemory:
            click.echo(f"  server memory limit: {cl.maxmemory / 2**20:.0f} MiB (--maxmemory)")
        if cl.ha is None:
            click.echo(f"  redis-cli -u {cl.redis_url} keys '{prefix}*'")
        click.echo(f"  CLOUDQ_REDIS_URL_FILE={cl.admin_url_file()} cloudq status")
        if cl.client_url != cl.redis_url:
            click.echo(f"  clients: CLOUDQ_REDIS_URL={cl.client_url} cloudq connect --user NAME")
        sys.stdout.flush()
        done.wait(duration or None)
        click.echo("stopping ...")
