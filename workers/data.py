"""The data management module's steps inside the session lifecycle.

``mount_session`` runs before a node starts its app; ``save_session`` runs when a session
closes, before the node returns to the pool. They are the real steps of the sequence; the
versioned store that fills them lives in :mod:`cloudq.workers.store`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import redis

from cloudq.keys import Keys

log = logging.getLogger(__name__)


def workspace_dir(root: str | Path, node_id: str) -> Path:
    """The directory a node's app reads and writes its user's data in."""
    return Path(root) / node_id / "data"


def mount_session(r: redis.Redis, keys: Keys, sid: str, user: str, node: str) -> None:
    log.info("mount: session %s user %s on node %s (no store configured)", sid, user, node)


def save_session(r: redis.Redis, keys: Keys, sid: str, user: str, node: str, final: bool) -> None:
    log.info("save: session %s user %s from node %s final=%s (no store configured)", sid, user, node, final)
