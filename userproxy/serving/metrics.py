"""Prometheus metrics: kube-proxy's sync series under their upstream names, and userproxy's
own per service port and endpoint. Each proxy instance has its own registry, so embedded
instances and tests never collide.

Most series are read from the proxy's live state at scrape time (a collector) rather than
updated on the hot path: the relay only bumps its plain integer counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from userproxy.model import Protocol

if TYPE_CHECKING:
    from userproxy.app import UserProxy
    from userproxy.provider import ProxyStatus

#: kube-proxy's buckets: ExponentialBuckets(0.001, 2, 15).
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))


class Metrics:
    def __init__(self, proxy: UserProxy, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            buckets=SYNC_BUCKETS,
            registry=self.registry,
        )
        self.healthz = Counter(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            ["code"],
            registry=self.registry,
        )
        self.livez = Counter(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            ["code"],
            registry=self.registry,
        )
        self.registry.register(_ProxyCollector(proxy))
        previous: Callable[[float], None] = proxy.runner.on_synced

        def synced(duration: float) -> None:
            self.sync_duration.observe(duration)
            previous(duration)

        proxy.runner.on_synced = synced


class _ProxyCollector(Collector):
    def __init__(self, proxy: UserProxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        status = self.proxy.status()
        yield from self._sync_series(status)
        yield from self._port_series(status)

    def _sync_series(self, status: ProxyStatus) -> Iterator[Metric]:
        runner, proxy = self.proxy.runner, self.proxy
        last = GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        )
        last.add_metric([], runner.synced_at or 0.0)
        queued = GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
        )
        queued.add_metric([], runner.last_queued_at or 0.0)
        changes = proxy.router.changes
        yield last
        yield queued
        yield _counter(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            changes["Service"],
        )
        yield _counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            changes["EndpointSlice"] + changes["Endpoints"],
        )
        yield _gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            status.pending_service_changes,
        )
        # Endpoint changes reach the balancer at once: none ever wait for a sync.
        yield _gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            0,
        )
        yield _counter(
            "userproxy_sync_failures", "Syncs that failed and were retried", runner.failures
        )
        for name, count in status.failures:
            yield _counter(
                f"kubeproxy_sync_proxy_rules_{name}_failures",
                f"Proxy rules {name.replace('_', ' ')} failures",
                count,
            )
        yield _counter(
            "userproxy_objects_rejected",
            "Objects or service ports refused as invalid",
            proxy.router.rejected,
        )

    def _port_series(self, status: ProxyStatus) -> Iterator[Metric]:
        labels = ["service_port", "protocol", "endpoint"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "active": GaugeMetricFamily(
                "userproxy_connections_active",
                "Open connections (TCP) or live flows (UDP) per endpoint",
                labels=labels,
            ),
            "total": CounterMetricFamily(
                "userproxy_connections",
                "Connections (TCP) or flows (UDP) relayed per endpoint",
                labels=labels,
            ),
            "bytes_from_clients": CounterMetricFamily(
                "userproxy_bytes_from_clients",
                "Bytes relayed from clients to the endpoint",
                labels=labels,
            ),
            "bytes_to_clients": CounterMetricFamily(
                "userproxy_bytes_to_clients",
                "Bytes relayed from the endpoint to clients",
                labels=labels,
            ),
            "dial_failures": CounterMetricFamily(
                "userproxy_dial_failures",
                "Failed connection attempts to the endpoint",
                labels=labels,
            ),
        }
        flows = GaugeMetricFamily(
            "userproxy_udp_flows_active", "Live UDP client flows", labels=labels
        )
        endpoints = GaugeMetricFamily(
            "userproxy_endpoints", "Endpoints in rotation", labels=["service_port", "protocol"]
        )
        local = GaugeMetricFamily(
            "userproxy_local_endpoints",
            "Ready endpoints on this node (what externalTrafficPolicy: Local and the Service "
            "health check use)",
            labels=["service_port", "protocol"],
        )
        rejected = CounterMetricFamily(
            "userproxy_rejected",
            "Connections or datagrams turned away for lack of endpoints",
            labels=["service_port", "protocol"],
        )
        # A dual-stack service port appears once per family: its per-port series add up.
        in_rotation: dict[tuple[str, str], int] = {}
        on_node: dict[tuple[str, str], int] = {}
        turned_away: dict[tuple[str, str], int] = {}
        for sp in status.service_ports:
            base = [str(sp.name), sp.port.protocol.value]
            key = (base[0], base[1])
            in_rotation[key] = in_rotation.get(key, 0) + sum(not e.removed for e in sp.endpoints)
            on_node[key] = on_node.get(key, 0) + sp.local_endpoints
            if sp.rejected is not None:
                turned_away[key] = turned_away.get(key, 0) + sp.rejected
            for e in sp.endpoints:
                if e.counters is None:
                    continue  # the kernel carries this traffic
                values = [*base, str(e.endpoint)]
                for field, family in families.items():
                    family.add_metric(values, getattr(e.counters, field))
                if sp.port.protocol is Protocol.UDP:
                    flows.add_metric(values, e.counters.active)
        for key, count in in_rotation.items():
            endpoints.add_metric(list(key), count)
        for key, count in turned_away.items():
            rejected.add_metric(list(key), count)
        for key, count in on_node.items():
            local.add_metric(list(key), count)
        yield from families.values()
        yield flows
        yield endpoints
        yield local
        yield rejected


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family
