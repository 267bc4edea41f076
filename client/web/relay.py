"""What the gateway's stream relays (audio, clipboard) share: following a stream from its end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis

Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def tail(r: aioredis.Redis, key: str, count: int, block_ms: int = 1000) -> AsyncIterator[Entries]:
    """The entries added to stream ``key`` after now, a read (at most ``count``) at a time."""
    newest = await r.xrevrange(key, count=1)
    last = newest[0][0] if newest else b"0-0"
    while True:
        resp = await r.xread({key: last}, count=count, block=block_ms)
        if resp:
            entries: Entries = resp[0][1]
            last = entries[-1][0]
            yield entries
