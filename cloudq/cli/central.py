"""``cloudq central``: run a central server replica."""

from __future__ import annotations

import logging
import threading
from typing import Any

import click
import redis

from cloudq.cli.common import (
    _connect,
    _cost_opt,
    _fail,
    _serve_metrics,
    _stop_on_signals,
    central_options,
    metrics_options,
    prefix_option,
    redis_url_option,
    settings_from,
)
from cloudq.keys import Keys
from cloudq.retry import Backoff, passing


@click.command()
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
@click.option(
    "--bcrypt-threads",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Password checks that run at once (the bcrypt budget).",
)
@click.option(
    "--bcrypt-waiting",
    default=32,
    show_default=True,
    type=click.IntRange(0, 10_000),
    help="Password checks that may wait for a thread; beyond, a login is answered 'busy'.",
)
@click.option(
    "--acl-full-every",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    envvar="CLOUDQ_ACL_FULL_EVERY",
    show_envvar=True,
    help="Seconds between full ACL passes (every Redis user against the live sessions; also at once "
    "on a new server); 0 = only on a new server.",
)
@click.option(
    "--replica-wait",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    envvar="CLOUDQ_REPLICA_WAIT",
    show_envvar=True,
    help="With replicas: a login, resume or logout is answered once a replica has it (WAIT 1), "
    "waiting at most this long (s); 0 = answer at once.",
)
@click.option(
    "--media-url",
    "media_urls",
    multiple=True,
    envvar="CLOUDQ_MEDIA_URLS",
    show_envvar=True,
    help="A media server for sessions' streams (repeat for several; redis:// or redis+sentinel://, "
    "with this central server's ACL user): sessions are spread over them, the rest stays on "
    "--redis-url. None: everything on --redis-url. The env var takes URLs separated by spaces.",
)
@click.option(
    "--media-check",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    envvar="CLOUDQ_MEDIA_CHECK",
    show_envvar=True,
    help="Seconds between looks at each media server (down: no new sessions there; back or "
    "restarted: its session users re-created); 0 = once at start.",
)
@metrics_options
def central(
    redis_url: str | None,
    prefix: str,
    no_notifications: bool,
    no_acl: bool,
    bcrypt_cost: int,
    bcrypt_threads: int,
    bcrypt_waiting: int,
    acl_full_every: float,
    replica_wait: float,
    media_urls: tuple[str, ...],
    media_check: float,
    metrics_port: int,
    metrics_addr: str,
    **kw: Any,
) -> None:
    """Run a central server (any number of replicas may run)."""
    from cloudq.central.metrics import CentralMetrics
    from cloudq.central.server import Central

    settings = settings_from(kw)
    r = _connect(redis_url)
    c = Central(
        r,
        Keys(prefix),
        settings,
        notifications=not no_notifications,
        use_acl=not no_acl,
        bcrypt_cost=bcrypt_cost,
        bcrypt_threads=bcrypt_threads,
        bcrypt_waiting=bcrypt_waiting,
        acl_full_every=acl_full_every,
        replica_wait=replica_wait,
        media_urls=media_urls,
        media_check=media_check,
    )
    _serve_metrics(metrics_port, metrics_addr, CentralMetrics(r, Keys(prefix), c.counters).registry)
    done = threading.Event()
    _stop_on_signals(done.set)
    backoff = Backoff()
    while True:
        try:
            c.start()
            break
        except redis.ConnectionError as exc:
            _fail(f"cannot reach Redis: {exc}", 5)
        except redis.RedisError as exc:
            if not passing(exc):
                raise
            # e.g. the server is out of memory (maxmemory) or a replica still: set up once it can
            logging.getLogger("cloudq.central").warning(
                "cannot set up yet: %s; again in <%.1f s", exc, backoff.peek()
            )
            if backoff.wait(done):
                return
    done.wait()  # a signal's handler sets it (a lock wait that signals interrupt: no polling)
    c.shutdown()
