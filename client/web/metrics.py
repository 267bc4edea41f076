"""Prometheus metrics of ``cloudq gateway`` (served on ``--metrics-port`` like every process's;
see the metrics table in README): read from the gateway's counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from cloudq.client.web.http import Gateway


class GatewayCollector:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterable[Metric]:
        gw = self.gw
        counters, closes, rights = dict(gw.counters), dict(gw.closes), dict(gw.rights)
        yield GaugeMetricFamily("cloudq_gateway_sockets", "Browser sockets open.", value=len(gw.sockets))
        logins = CounterMetricFamily("cloudq_gateway_logins", "Logins relayed, by result.", labels=["result"])
        for name, n in sorted(counters.items()):
            if name.startswith("login_"):
                logins.add_metric([name.removeprefix("login_")], n)
        yield logins
        shut = CounterMetricFamily(
            "cloudq_gateway_socket_closes", "Sockets the gateway closed, by reason.", labels=["reason"]
        )
        for reason, n in sorted(closes.items()):
            shut.add_metric([reason], n)
        yield shut
        by_rights = CounterMetricFamily(
            "cloudq_gateway_sockets_opened",
            "Session sockets, by the Redis rights they ran with.",
            labels=["rights"],
        )
        for kind, n in sorted(rights.items()):
            by_rights.add_metric([kind], n)
        yield by_rights
        yield CounterMetricFamily(
            "cloudq_gateway_heartbeats",
            "Heartbeats beaten for open sockets.",
            value=counters.get("heartbeats", 0),
        )


def gateway_registry(gw: Gateway) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GatewayCollector(gw))  # type: ignore[arg-type]
    return registry
