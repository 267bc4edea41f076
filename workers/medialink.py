"""A node's link to its session's media server (:mod:`cloudq.media`), and what losing it means.

When the session's streams live on the control server (no media servers), the link is that
server and changes nothing: a Redis error there is the node loop's business, as always. When they
live on a media server, an outage of that server must not look like an outage of the node: the
node keeps its liveness and its session on the control server, so the link catches the media
server's connection errors itself (:meth:`MediaLink.failed`), records ``media_lost`` (the control
server's time) in the session hash for clients and operators, and the node stops rendering until
:meth:`MediaLink.ready` sees the server answer again (a ``PING`` at most every ``retry_max`` s);
then ``media_lost`` goes and the node starts again with a keyframe. The session is never moved
or closed for it: heartbeats go to the control server.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import redis

from cloudq.keys import Keys
from cloudq.media import LOST_FIELD, connect_like
from cloudq.retry import Backoff

log = logging.getLogger(__name__)

MEDIA_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class MediaLink:
    """The client the session's streams go through (:attr:`r`) and whether it works."""

    def __init__(
        self,
        control: redis.Redis,
        keys: Keys,
        sid: str,
        url: str,
        counters: Counter[str],
        retry_max: float = 1.0,
    ) -> None:
        self.control, self.keys, self.sid, self.url, self.counters = control, keys, sid, url, counters
        self.separate = bool(url)
        self.r = connect_like(url, control) if url else control
        self.lost_at: float | None = None
        """Monotonic time the media server was lost (None: it works)."""
        self._backoff = Backoff(0.05, max(0.05, retry_max))
        self._next_try = 0.0

    def owns(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the media server's outage (the link deals with it), not the node's."""
        return self.separate and isinstance(exc, MEDIA_ERRORS)

    def failed(self, exc: BaseException) -> None:
        """A call to the media server failed with ``exc`` (:meth:`owns` it): the session's media
        pauses until :meth:`ready`."""
        now = time.monotonic()
        self._next_try = now + self._backoff.next()
        if self.lost_at is not None:
            return
        self.lost_at = now
        self.counters["media_lost"] += 1
        log.warning("session %s: media server %s lost (%s); its streams pause", self.sid, self.url, exc)
        try:
            sec, usec = self.control.time()
            self.control.hset(self.keys.session(self.sid), LOST_FIELD, f"{sec + usec / 1e6:.3f}")
        except redis.RedisError as err:  # the control server too: the node loop will notice
            log.debug("could not record media_lost: %s", err)

    def ready(self) -> bool | None:
        """True when the media server works; None while it is lost; False the first time it
        answers again (recorded: the caller restarts its reader and sends a keyframe)."""
        if self.lost_at is None:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return None
        try:
            self.r.ping()
        except redis.RedisError as exc:
            self._next_try = now + self._backoff.next()
            log.debug("media server %s still lost: %s", self.url, exc)
            return None
        self.control.hdel(self.keys.session(self.sid), LOST_FIELD)
        log.warning("session %s: media server %s back after %.1f s", self.sid, self.url, now - self.lost_at)
        self.lost_at = None
        self._backoff.reset()
        self.counters["media_recovered"] += 1
        return False

    def close(self) -> None:
        if self.separate:
            self.r.close()


@contextlib.contextmanager
def refreshing(refresh: Callable[[], object], every: float) -> Iterator[None]:
    """Call ``refresh`` every ``every`` s from a helper thread while the body runs (a node's
    liveness while its loop is busy in a slow call); its Redis errors are logged, not raised."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(every):
            try:
                refresh()
            except redis.RedisError as exc:
                log.debug("keepalive refresh failed: %s", exc)

    th = threading.Thread(target=run, name="keepalive", daemon=True)
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join()
