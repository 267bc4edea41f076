"""The gateway's audio relay: ``session:{sid}:audio`` (Opus packets the node writes while the session
is awake, :mod:`cloudq.workers.audio`) to the page as binary WebSocket messages of type 2 (the
layout is in the package docstring). The page decodes them with WebCodecs (``static/audio.js``).

Audio is live or useless: the relay starts at the stream's end, and a socket more than
:data:`AUDIO_BEHIND` packets behind drops the older ones (counted as ``audio_skipped``)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cloudq.client.web.relay import tail
from cloudq.wire import AudioPacket
from cloudq.wire import BadMessage as BadWire

if TYPE_CHECKING:
    from cloudq.client.web.socket import Socket

__all__ = ["AUDIO_HEADER", "MSG_AUDIO", "audio_loop", "pack_audio"]

AUDIO_HEADER = struct.Struct("<BBBBIQqd")
MSG_AUDIO = 2
CODECS = {"opus": 1}
AUDIO_BEHIND = 15
"""Packets (20 ms each): a socket further behind than 0.3 s skips to the newest."""


def pack_audio(ap: AudioPacket) -> bytes:
    """One audio packet as the page's binary WebSocket message (see the package docstring)."""
    ts_us = ap.pts * 1_000_000 // ap.rate
    head = AUDIO_HEADER.pack(
        MSG_AUDIO, CODECS.get(ap.codec, 0), ap.channels, 0, ap.rate, ap.seq, ts_us, ap.capture_time
    )
    return head + ap.data


async def audio_loop(sock: Socket) -> None:
    """XREAD the session's audio stream from its end and forward each valid packet."""
    assert sock.mr is not None
    counters = sock.gw.counters
    async for entries in tail(sock.mr, sock.keys.audio(sock.sid), 4 * AUDIO_BEHIND):
        if len(entries) > AUDIO_BEHIND:
            counters["audio_skipped"] += len(entries) - AUDIO_BEHIND
            entries = entries[-AUDIO_BEHIND:]
        for _, fields in entries:
            try:
                ap = AudioPacket.unpack(fields)
            except BadWire:
                counters["bad_audio_entries"] += 1
                continue
            await sock.ws.send_bytes(pack_audio(ap))
            counters["audio_packets"] += 1
