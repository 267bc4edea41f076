"""Every Redis connection a cloudq process opens, from one URL: a server, or a Sentinel service.

``redis://[user:password@]host:port/DB`` (``rediss://`` for TLS) names one server.
``redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/DB]`` names the Sentinels
that watch SERVICE: redis-py's :class:`~redis.sentinel.Sentinel` asks them for the current
primary, and every new connection does so again, so after a failover the pool reconnects to the
new primary by itself (``READONLY`` from a demoted one counts as a connection error there). The
user and password are the data servers' (the role's ACL user); the Sentinels themselves are
reached without credentials. :func:`connect` is the sync client, :func:`aconnect` the asyncio
one (the browser gateway); :func:`with_credentials` makes another client for the same servers
as another user (a session's Redis user), through the same Sentinels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncManagedConnection
from redis.asyncio.sentinel import SentinelManagedSSLConnection as AsyncManagedSSLConnection
from redis.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


@dataclass(frozen=True)
class SentinelURL:
    hosts: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def parse_sentinel(url: str) -> SentinelURL:
    """The parts of a ``redis+sentinel://`` URL; ``ValueError`` with what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: {parts.scheme}://")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) if colon else None
    hosts = []
    for item in filter(None, hostlist.split(",")):
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        try:
            hosts.append((host, int(port or 26379)))
        except ValueError:
            raise ValueError(f"bad Sentinel address {item!r} in the URL") from None
    path = [p for p in parts.path.split("/") if p]
    if not hosts or not path:
        raise ValueError(
            "a Sentinel URL is redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/DB]"
        )
    try:
        db = int(path[1]) if len(path) > 1 else 0
    except ValueError:
        raise ValueError(f"bad database number {path[1]!r} in the URL") from None
    return SentinelURL(hosts, path[0], db, username, password, parts.scheme.startswith("rediss"))


class SentinelConnection(SentinelManagedConnection):
    """A connection to the primary of the moment. redis-py's own reconnects a dropped connection
    through the Sentinels only in ``connect()``; a command sent on it while it is down (a pub/sub
    health check, RQ's command channel) reconnects straight to the last primary's address, the
    dead one after a failover, and keeps failing there for good. Here every reconnect asks."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()  # through the Sentinels
        super().send_packed_command(command, check_health)


class SentinelSSLConnection(SentinelConnection, SentinelManagedSSLConnection):
    pass


class AsyncSentinelConnection(AsyncManagedConnection):
    """:class:`SentinelConnection` for asyncio."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()  # through the Sentinels
        await super().send_packed_command(command, check_health)


class AsyncSentinelSSLConnection(AsyncSentinelConnection, AsyncManagedSSLConnection):
    pass


class AsyncSentinelRedis(aioredis.Redis):
    """:func:`aconnect`'s client for a Sentinel URL: it has Sentinel clients of its own (the
    gateway makes one per browser session), closed with it rather than left to the garbage
    collector."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if close_connection_pool or (close_connection_pool is None and self.auto_close_connection_pool):
            for s in self.connection_pool.sentinel_manager.sentinels:
                await s.aclose()


def _sentinel_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k.startswith("socket_")}


def connect(url: str, **kw: Any) -> redis.Redis:
    """A client for ``url`` (a server or a Sentinel service); ``kw`` as :class:`redis.Redis`
    takes them (``username``/``password`` given here win over the URL's)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kw)
    u = parse_sentinel(url)
    kw.setdefault("username", u.username)
    kw.setdefault("password", u.password)
    ssl = kw.pop("ssl", u.ssl)
    kw.setdefault("connection_class", SentinelSSLConnection if ssl else SentinelConnection)
    sentinel = Sentinel(u.hosts, sentinel_kwargs=_sentinel_kwargs(kw), db=u.db, **kw)
    return sentinel.master_for(u.service)


def aconnect(url: str, **kw: Any) -> aioredis.Redis:
    """:func:`connect` for asyncio (the browser gateway)."""
    if not is_sentinel(url):
        return aioredis.Redis.from_url(url, **kw)
    u = parse_sentinel(url)
    kw.setdefault("username", u.username)
    kw.setdefault("password", u.password)
    ssl = kw.pop("ssl", u.ssl)
    kw.setdefault("connection_class", AsyncSentinelSSLConnection if ssl else AsyncSentinelConnection)
    sentinel = AsyncSentinel(u.hosts, sentinel_kwargs=_sentinel_kwargs(kw), db=u.db, **kw)
    return sentinel.master_for(u.service, redis_class=AsyncSentinelRedis)


def with_credentials(r: redis.Redis, **kw: Any) -> redis.Redis:
    """A client for the same server(s) as ``r``, with the same options but these credentials
    (``credential_provider=…``, or ``username=…, password=…``); through the same Sentinels."""
    pool = r.connection_pool
    base = dict(pool.connection_kwargs)
    for k in ("username", "password", "credential_provider"):
        base.pop(k, None)
    base.update(kw)
    if isinstance(pool, SentinelConnectionPool):
        # the same connection class: TLS and the reconnect through the Sentinels stay
        return redis.Redis(
            connection_pool=SentinelConnectionPool(
                pool.service_name, pool.sentinel_manager, connection_class=pool.connection_class, **base
            )
        )
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **base))


def without_credentials(url: str) -> str:
    """``url`` without its user and password (a session user must not inherit a role's)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc))


def read_block(r: redis.Redis, want: float) -> float:
    """How long a blocking read on ``r`` may block: ``want`` s, or half the socket timeout of its
    connections if that is shorter (a read still blocked when the socket times out fails). The
    timeout comes from a connection object (not connected): redis-py 8 gives a client made without
    one a default of 5 s that its pool's ``connection_kwargs`` do not show."""
    pool = r.connection_pool
    kw = pool.connection_kwargs
    timeout = kw["socket_timeout"] if "socket_timeout" in kw else pool.connection_class(**kw).socket_timeout
    return min(want, timeout / 2) if timeout else want
