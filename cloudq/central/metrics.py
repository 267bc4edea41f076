"""The central server's metrics (the table of every process's metrics: :mod:`cloudq.metrics`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cloudq.keys import Keys
from cloudq.media import LOST_FIELD
from cloudq.state import NODE_STATES, SESSION_STATES

log = logging.getLogger(__name__)

WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class CentralCollector:
    """Reads the system's state from Redis at scrape time, and the central server's counters."""

    def __init__(self, r: redis.Redis, keys: Keys, counters: Mapping[str, int]) -> None:
        self.r = r
        self.keys = keys
        self.counters = counters

    def collect(self) -> Iterable[Metric]:
        for prefix, name, doc, label in (
            ("login_", "cloudq_logins", "Login requests, by result.", "result"),
            ("resume_", "cloudq_resumes", "Resumes (clients back after an outage), by result.", "result"),
            (
                "restarts_",
                "cloudq_central_loop_restarts",
                "Central server loop restarts after an error.",
                "loop",
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for counter, n in sorted(self.counters.items()):
                if counter.startswith(prefix):
                    family.add_metric([counter.removeprefix(prefix)], n)
            yield family
        try:
            yield from self._collect()
        except redis.RedisError as exc:  # a scrape during an outage: no state metrics, no crash
            log.warning("metrics: cannot read Redis: %s", exc)

    def _collect(self) -> Iterable[Metric]:
        k = self.keys
        sids = [s.decode() for s in self.r.smembers(k.sessions)]
        nodes = [n.decode() for n in self.r.smembers(k.nodes)]
        pipe = self.r.pipeline()
        for s in sids:
            pipe.hmget(k.session(s), "state", LOST_FIELD)
        for n in nodes:
            pipe.hmget(k.node(n), "state", "drained")
        pipe.llen(k.queue)
        pipe.scard(k.media_down)
        pipe.zrange(k.deadlines, 0, 0, withscores=True)
        pipe.time()
        out: list[Any] = pipe.execute()
        s_states, n_rows = out[: len(sids)], out[len(sids) : len(sids) + len(nodes)]
        qlen, media_down, first, (secs, usecs) = out[-4], out[-3], out[-2], out[-1]
        sessions = GaugeMetricFamily(
            "cloudq_sessions", "Sessions not yet closed, by state.", labels=["state"]
        )
        for state in SESSION_STATES:
            if state != "closed":
                sessions.add_metric([state], sum(1 for v, _ in s_states if v and v.decode() == state))
        yield sessions
        yield GaugeMetricFamily(
            "cloudq_sessions_media_lost",
            "Sessions whose node cannot reach their media server (their streams pause; they are kept).",
            value=sum(1 for _, lost in s_states if lost),
        )
        yield GaugeMetricFamily(
            "cloudq_media_servers_down", "Media servers the central server cannot reach.", value=media_down
        )
        by_node = GaugeMetricFamily("cloudq_nodes", "Nodes, by state.", labels=["state"])
        for state in NODE_STATES:
            by_node.add_metric([state], sum(1 for v, _ in n_rows if v and v.decode() == state))
        yield by_node
        yield GaugeMetricFamily(
            "cloudq_nodes_drained", "Nodes an operator drained.", value=sum(1 for _, d in n_rows if d == b"1")
        )
        yield GaugeMetricFamily("cloudq_queue_length", "Users waiting for a node.", value=qlen)
        now = secs + usecs / 1e6
        lag = max(0.0, now - first[0][1]) if first else 0.0
        yield GaugeMetricFamily(
            "cloudq_sweeper_lag_seconds",
            "How far the earliest due deadline is behind the server's clock (0 = nothing overdue).",
            value=lag,
        )


class CentralMetrics:
    """The central server's registry: state from Redis, its login counters, queue waits."""

    def __init__(self, r: redis.Redis, keys: Keys, counters: Mapping[str, int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(CentralCollector(r, keys, counters))  # type: ignore[arg-type]
        self.queue_wait = Histogram(
            "cloudq_queue_wait_seconds",
            "Time a user waited in the queue before a node was assigned.",
            buckets=WAIT_BUCKETS,
            registry=None,
        )
        # the drain first: a scrape reports the waits it just moved into the histogram
        self.registry.register(_QueueWaits(r, keys, self.queue_wait))  # type: ignore[arg-type]
        self.registry.register(self.queue_wait)


class _QueueWaits:
    """Moves the waits the dispatch script recorded into the histogram at scrape time (each wait
    is taken by exactly one replica: LPOP), then reports nothing itself."""

    def __init__(self, r: redis.Redis, keys: Keys, hist: Histogram) -> None:
        self.r, self.keys, self.hist = r, keys, hist

    def collect(self) -> Iterable[Metric]:
        try:
            waits = self.r.lpop(self.keys.queue_waits, 1000) or []
        except redis.RedisError:
            waits = []
        for w in waits:
            try:
                self.hist.observe(max(0.0, float(w)))
            except ValueError:
                continue
        return []
