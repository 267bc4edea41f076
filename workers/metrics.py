"""Prometheus metrics of the cloud server's processes (served by ``cloudq.metrics.serve``).

A node's metrics plug into its media loop as a :class:`~cloudq.workers.node.MediaObserver`
(encode time, wake latency, frame times for the fps gauge) and read its counters at scrape
time; a worker's come from the parent process after each job's work horse ends (RQ runs the job
itself in a forked child, whose memory the parent never sees).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from cloudq.workers.node import Node

ENCODE_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.033, 0.066, 0.133, 0.5)
WAKE_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
FPS_WINDOW = 5.0
"""Seconds over which ``cloudq_node_fps`` counts frames."""

_COUNTERS = (
    ("frames", "cloudq_node_frames", "Frames encoded."),
    ("keyframes", "cloudq_node_keyframes", "Keyframes (IDR) sent."),
    ("video_bytes", "cloudq_node_video_bytes", "H.264 bytes sent to video streams."),
    ("input", "cloudq_node_input_events", "Input events received."),
    ("bad_input", "cloudq_node_bad_input", "Input entries dropped as malformed or oversized."),
    ("bad_control", "cloudq_node_bad_control", "Control messages dropped as malformed."),
)


class NodeMetrics:
    """A node's registry; pass it to :class:`Node` as its ``observer``, then :meth:`attach`."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.registry = CollectorRegistry()
        self.encode = Histogram(
            "cloudq_node_encode_seconds",
            "Time to encode one frame.",
            ["node"],
            buckets=ENCODE_BUCKETS,
            registry=self.registry,
        ).labels(node_id)
        self.wake = Histogram(
            "cloudq_node_wake_seconds",
            "From input reaching a sleeping node to its first frame in the video stream.",
            ["node"],
            buckets=WAKE_BUCKETS,
            registry=self.registry,
        ).labels(node_id)
        self.frame_times: collections.deque[float] = collections.deque(maxlen=4096)
        self.node: Node | None = None

    def attach(self, node: Node) -> NodeMetrics:
        self.node = node
        self.registry.register(self)  # type: ignore[arg-type]
        return self

    # -- MediaObserver ------------------------------------------------------------------------
    def on_frame(self, encode_s: float, nbytes: int) -> None:
        self.encode.observe(encode_s)
        self.frame_times.append(time.monotonic())

    def on_wake_frame(self, latency_s: float) -> None:
        self.wake.observe(latency_s)

    # -- collector ----------------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        node = self.node
        if node is None:
            return
        counters = dict(node.counters)
        for key, name, doc in _COUNTERS:
            m = CounterMetricFamily(name, doc, labels=["node"])
            m.add_metric([self.node_id], counters.get(key, 0))
            yield m
        since = time.monotonic() - FPS_WINDOW
        recent = sum(1 for t in list(self.frame_times) if t >= since)
        fps = GaugeMetricFamily(
            "cloudq_node_fps", f"Frames encoded per second over {FPS_WINDOW:g} s.", labels=["node"]
        )
        fps.add_metric([self.node_id], recent / FPS_WINDOW)
        yield fps
        slept = CounterMetricFamily("cloudq_node_sleeping_seconds", "Seconds spent asleep.", labels=["node"])
        slept.add_metric([self.node_id], node.sleeping_seconds())
        yield slept
        busy = GaugeMetricFamily("cloudq_node_session", "1 while the node serves a session.", labels=["node"])
        busy.add_metric([self.node_id], int(node.session is not None))
        yield busy


class JobMetrics:
    """What an RQ worker process did: jobs by kind and result, with durations."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "cloudq_jobs", "Jobs run, by kind and result.", ["kind", "result"], registry=self.registry
        )
        self.duration = Histogram(
            "cloudq_job_duration_seconds",
            "Job run time.",
            ["kind"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )

    def observe(self, kind: str, result: str, seconds: float) -> None:
        self.jobs.labels(kind, result).inc()
        self.duration.labels(kind).observe(seconds)
