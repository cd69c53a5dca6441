"""Builders for the Kubernetes objects the proxy reads, for code and tests that declare
services without writing YAML. They return plain dicts, exactly what a YAML file would give.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from userproxy.convert import SERVICE_NAME_LABEL
from userproxy.model import Family

PortSpec = tuple[str, int] | tuple[str, int, str] | dict[str, Any]


def _port(spec: PortSpec) -> dict[str, Any]:
    if isinstance(spec, dict):
        return dict(spec)
    name, number, *rest = spec
    return {"name": name, "port": number, "protocol": rest[0] if rest else "TCP"}


def service(
    name: str,
    *,
    cluster_ip: str,
    ports: Sequence[PortSpec],
    namespace: str = "default",
    external_ips: Iterable[str] = (),
    load_balancer_ips: Iterable[str] = (),
    session_affinity: bool = False,
    affinity_timeout: int | None = None,
    type: str = "ClusterIP",
    labels: dict[str, str] | None = None,
    cluster_ips: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A v1 Service. A port is `(name, port[, protocol])` or a full port dict (for nodePort).
    `cluster_ips` (primary first, `cluster_ip` among them) makes it dual-stack."""
    ips = list(cluster_ips or [cluster_ip])
    spec: dict[str, Any] = {
        "type": type,
        "clusterIP": cluster_ip,
        "clusterIPs": ips,
        "ipFamilies": [Family.of(ip).value for ip in ips],
        "ipFamilyPolicy": "PreferDualStack" if len(ips) > 1 else "SingleStack",
        "ports": [_port(p) for p in ports],
    }
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if session_affinity:
        spec["sessionAffinity"] = "ClientIP"
        if affinity_timeout is not None:
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec,
    }
    if load_balancer_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in load_balancer_ips]}}
    return obj


def endpoint_slice(
    service_name: str,
    *,
    addresses: Iterable[str],
    ports: Sequence[PortSpec],
    namespace: str = "default",
    name: str | None = None,
    ready: bool = True,
    node_name: str | None = None,
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice for `service_name` with the same conditions on all."""
    addresses = list(addresses)
    endpoints = []
    for address in addresses:
        ep: dict[str, Any] = {"addresses": [address], "conditions": {"ready": ready}}
        if node_name:
            ep["nodeName"] = node_name
        endpoints.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-slice",
            "namespace": namespace,
            "labels": {SERVICE_NAME_LABEL: service_name},
        },
        "addressType": (
            Family.IPv6 if any(Family.of(a) is Family.IPv6 for a in addresses) else Family.IPv4
        ).value,
        "endpoints": endpoints,
        "ports": [_port(p) for p in ports],
    }
