"""The gateway's clipboard relay. Page -> node: a ``clipboard`` input message (the only page
message allowed past ``max_message``, up to :data:`CLIP_MESSAGE`; :mod:`.socket`). Node -> page:
each new entry of ``session:{sid}:clip`` (the text a program in the session put on its
CLIPBOARD, :mod:`cloudq.workers.streamer`) goes out as ``{"t": "clipboard", "text": ...}``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cloudq.client.web.relay import tail
from cloudq.wire import MAX_CLIPBOARD_BYTES

if TYPE_CHECKING:
    from cloudq.client.web.socket import Socket

__all__ = ["CLIP_MESSAGE", "clip_loop"]

CLIP_MESSAGE = 2 * MAX_CLIPBOARD_BYTES + 4096
"""Longest page message carrying clipboard text (JSON escapes may double a text's size)."""


async def clip_loop(sock: Socket) -> None:
    """XREAD the session's clip stream from its end and forward each text to the page."""
    assert sock.mr is not None
    counters = sock.gw.counters
    async for entries in tail(sock.mr, sock.keys.clip(sock.sid), 4):
        raw = entries[-1][1].get(b"text")  # only the newest matters
        if not isinstance(raw, bytes) or not raw or len(raw) > MAX_CLIPBOARD_BYTES:
            counters["bad_clip_entries"] += 1
            continue
        text = raw.decode(errors="replace")
        await sock.ws.send_str(json.dumps({"t": "clipboard", "text": text}, separators=(",", ":")))
        counters["clipboard_out"] += 1
