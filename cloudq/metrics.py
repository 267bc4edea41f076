"""Prometheus metrics: one registry per process, served on ``--metrics-port`` (0 = off).

Names follow Prometheus conventions (``cloudq_`` prefix, ``_total`` counters, ``_seconds``
durations, base units). Counters and histograms are per process; Prometheus sums them across
replicas. State that lives in Redis (sessions and nodes by state, queue length, sweeper lag) is
read at scrape time by the central server's collector, so every central replica reports the same
truth and nothing drifts.

| metric | type | labels | process |
|---|---|---|---|
| ``cloudq_sessions`` | gauge | state | central |
| ``cloudq_nodes`` | gauge | state | central |
| ``cloudq_nodes_drained`` | gauge | | central |
| ``cloudq_queue_length`` | gauge | | central |
| ``cloudq_sweeper_lag_seconds`` | gauge | | central |
| ``cloudq_logins_total`` | counter | result | central |
| ``cloudq_central_loop_restarts_total`` | counter | loop | central |
| ``cloudq_queue_wait_seconds`` | histogram | | central |
| ``cloudq_jobs_total`` | counter | kind, result | worker |
| ``cloudq_job_duration_seconds`` | histogram | kind | worker |
| ``cloudq_node_frames_total``, ``..._keyframes_total`` | counter | node | node |
| ``cloudq_node_video_bytes_total`` | counter | node | node |
| ``cloudq_node_fps`` | gauge | node | node |
| ``cloudq_node_encode_seconds`` | histogram | node | node |
| ``cloudq_node_wake_seconds`` | histogram | node | node |
| ``cloudq_node_sleeping_seconds_total`` | counter | node | node |
| ``cloudq_node_input_events_total``, ``..._bad_input_total`` | counter | node | node |
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def serve(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> Callable[[], None] | None:
    """Serve ``/metrics`` on ``addr:port`` in a thread; returns a function that stops it (0 = off)."""
    if not port:
        return None
    server, thread = start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
