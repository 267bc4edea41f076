"""``cloudq connect`` without a window: log in, beat, play the video into sinks (recording,
snapshot), watch the session, log out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from cloudq.client.kernel import Kernel, session_state
from cloudq.client.launcher import ClientError, Launcher
from cloudq.client.sinks import Mp4Recorder, Sink, SnapshotSink
from cloudq.keys import Keys

log = logging.getLogger(__name__)

REASONS = {
    "grace": "the session was closed: the client was gone longer than the reconnect grace",
    "idle": "the session was closed: no input for too long",
    "max_session": "the session was closed: it reached the maximum session length",
    "logout": "the session was closed: logged out elsewhere",
}


def run_connect(
    r: redis.Redis,
    keys: Keys,
    user: str,
    password: str,
    duration: float = 0,
    queue_wait: float | None = None,
    stop: threading.Event | None = None,
    say: Callable[[str], None] = lambda m: None,
    poll: float = 0.2,
    record: str | None = None,
    snapshot: str | None = None,
    sinks: list[Sink] | None = None,
) -> str:
    """Run a session until ``duration`` passes or ``stop`` is set; returns why it ended.

    The video is received for the whole session: ``record`` remuxes it into an MP4 file,
    ``snapshot`` writes the last frame as a PNG at exit, ``sinks`` adds any others.

    Raises :class:`ClientError` if login fails or the server closes the session.
    """
    stop = stop or threading.Event()
    launcher = Launcher(r, keys)
    ticket = launcher.login(
        user, password, wait=queue_wait, on_position=lambda p: say(f"queued: position {p}")
    )
    say(f"session {ticket.sid} on node {ticket.node or '(being moved)'} ({ticket.status})")
    all_sinks = list(sinks or [])
    if record:
        all_sinks.append(Mp4Recorder(record))
    if snapshot:
        all_sinks.append(SnapshotSink(snapshot))
    kernel = Kernel(
        r, keys, ticket.sid, launcher.settings, all_sinks, on_input=lambda: launcher.mark_activity(ticket.sid)
    ).start()
    closed_by_server = False
    try:
        launcher.mark_activity(ticket.sid)
        end = time.monotonic() + duration if duration else None
        while not stop.is_set() and (end is None or time.monotonic() < end):
            try:
                state, reason = session_state(r, keys, ticket.sid)
            except redis.ConnectionError:
                state, reason = "unknown", ""
            if state == "closed" or reason:
                closed_by_server = True
                raise ClientError(
                    "closed", REASONS.get(reason, f"the session was closed ({reason or 'unknown'})")
                )
            stop.wait(poll if end is None else max(0.0, min(poll, end - time.monotonic())))
        return "session ended"
    finally:
        kernel.close()
        counts = kernel.player.counters
        log.info("video: %s", dict(counts))
        if counts["bad_entries"] or counts["decode_errors"] or counts["gaps"]:
            say(
                f"video: {counts['bad_entries']} bad entries, {counts['decode_errors']} decode errors, "
                f"{counts['gaps']} gaps (each dropped until the next keyframe)"
            )
        if not closed_by_server:
            launcher.logout(ticket.token)
