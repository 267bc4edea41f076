"""Where a session's streams live: the media plane, spread over independent media servers.

One Redis holds everything by default. With media servers (``cloudq central --media-url URL``,
once per server), the control plane (sessions, nodes, queue, deadlines, heartbeats, RQ) stays
on the main server, where its scripts and RQ need it, and the **streams** of a session (video,
input, audio, clip, files, fileout: everything a frame or a keystroke passes through) live on
one media server:

- The central server publishes the media servers' addresses (URLs without credentials) in the
  settings hash, field :data:`FIELD`, space-separated, and keeps the set ``media:down`` of those
  it cannot reach.
- A new session is placed when it is created (``create_session`` in ``scripts/_lib.lua``): the
  media servers in turn by session number, skipping those down. The session hash keeps the
  address (field :data:`FIELD`) for the session's life, so a session moved to another node keeps
  its streams where they are. ``""`` means the control server itself.
- Every process that touches a session's streams connects to that address with its own
  credentials (:func:`connect_like`): the node as the node role, a client as the session's own
  ACL user, which the central server creates on the session's media server too
  (:mod:`cloudq.central.media`).
- A node that loses its session's media server records ``media_lost`` (server time) in the
  session hash, stops encoding and retries; the session is neither moved nor closed (heartbeats
  go to the control server), and when the server answers again the node records it back and
  starts with a keyframe.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

from cloudq.connection import aconnect, connect
from cloudq.keys import Keys

FIELD = "media"
"""The settings hash field listing the media servers, and the session hash field naming its one."""
LOST_FIELD = "media_lost"
"""Session hash field: server time when the session's node lost its media server (absent: fine)."""

_CARRIED = (
    "username",
    "password",
    "credential_provider",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "health_check_interval",
    "retry_on_timeout",
    "client_name",
)


def parse(raw: bytes | str | None) -> list[str]:
    """The published list (the settings hash's ``media`` field) as URLs."""
    text = raw.decode() if isinstance(raw, bytes) else (raw or "")
    return text.split()


def session_media(r: redis.Redis, keys: Keys, sid: str) -> str:
    """The media server of session ``sid`` (``""``: the control server)."""
    return (r.hget(keys.session(sid), FIELD) or b"").decode()


def _carried(like: redis.Redis | aioredis.Redis) -> dict[str, Any]:
    base = like.connection_pool.connection_kwargs
    return {k: base[k] for k in _CARRIED if base.get(k) is not None}


def connect_like(url: str, like: redis.Redis, **kw: Any) -> redis.Redis:
    """A client for media server ``url`` (a server or a Sentinel URL, no credentials) with the
    credentials and socket options of ``like``; ``kw`` wins over both."""
    return connect(url, **{**_carried(like), **kw})


def aconnect_like(url: str, like: aioredis.Redis, **kw: Any) -> aioredis.Redis:
    """:func:`connect_like` for asyncio (the browser gateway)."""
    return aconnect(url, **{**_carried(like), **kw})
