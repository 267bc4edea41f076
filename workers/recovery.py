"""How a node recovers when the control server's view of it changed under it: declared offline
while it still ran (it stalled past its TTL), or a server restart that lost its keys. A part of
:class:`cloudq.workers.node.Node` (its base class), kept apart for size."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("cloudq.workers.node")


class NodeIdTaken(RuntimeError):
    """Another live process already serves this node id."""


class NodeFailed(RuntimeError):
    """The node met an error it cannot survive (the message says which); the process ends."""


class Recovery:
    """:class:`~cloudq.workers.node.Node`'s recovery paths (they use its state and methods)."""

    id: str
    instance: str
    session: Any
    sm: Any
    register: Callable[[], None]
    sleep: Callable[[], None]
    save_to_store: Callable[..., str]
    stop_session: Callable[..., bool]

    def declared_offline(self) -> None:
        """The central server judged this node dead (it stalled past its TTL) while it still runs.

        The app's state is the newest copy of the user's work: take the session back if nobody
        took it, otherwise save the workspace to the store (the normal save path, under the
        user's save lock) before letting go, then register again.
        """
        sess = self.session
        if sess is None:
            log.warning("node %s was declared offline; registering again", self.id)
            self.register()
            return
        status = self.sm.rejoin_node(self.id, self.instance, sess.sid)
        if status not in ("taken", "gone", "not-owner"):
            log.warning(
                "node %s was declared offline; rejoined with session %s (%s)", self.id, sess.sid, status
            )
            self.sleep()
            return
        log.warning("node %s was declared offline; session %s %s: saving its work", self.id, sess.sid, status)
        if status != "not-owner":
            self.save_to_store(f"node {self.id} declared offline")
        self.stop_session("declared offline", save=False)
        if status == "not-owner":
            raise NodeIdTaken(f"node id {self.id!r} was taken over by another process")
        self.register()

    def lost_by_server(self) -> None:
        """The server restarted without our keys (no persistence): save the session's work (the
        node knows whose workspace it mounted), record the session as closed, register again."""
        sess = self.session
        if sess is not None:
            log.warning("node %s: the server lost its keys; saving session %s", self.id, sess.sid)
            self.save_to_store(f"node {self.id}: server restarted without the session", require_marker=False)
            self.sm.lost_session(sess.sid, sess.user, self.id)
            self.stop_session("server restarted without it", save=False)
        else:
            log.warning("node %s: the server lost its keys; registering again", self.id)
        self.register()
