"""Kubernetes objects -> model: what is served, what is skipped, what is refused and why."""

from __future__ import annotations

from typing import Any

import pytest

from userproxy import convert
from userproxy.model import (
    Affinity,
    Endpoint,
    EndpointInfo,
    Family,
    Protocol,
    ServicePortName,
    usable_endpoints,
)
from userproxy.objects import endpoint_slice, service


def test_service_port_names() -> None:
    assert str(ServicePortName("ns", "web", "http")) == "ns/web:http"
    assert str(ServicePortName("ns", "web")) == "ns/web"


def test_full_service() -> None:
    obj = service(
        "web",
        namespace="shop",
        cluster_ip="10.96.0.10",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}, ("dns", 53, "UDP")],
        external_ips=["192.168.1.5"],
        load_balancer_ips=["203.0.113.7"],
        session_affinity=True,
        affinity_timeout=60,
    )
    obj["status"]["loadBalancer"]["ingress"].append({"hostname": "lb.example.com"})
    result = convert.service_ports(obj)
    assert result.skipped is None and result.problems == ()
    http, dns = result.ports
    assert http.name == ServicePortName("shop", "web", "http", Protocol.TCP)
    assert (http.cluster_ip, http.port, http.node_port) == ("10.96.0.10", 80, 30080)
    assert http.external_ips == ("192.168.1.5",)
    assert http.load_balancer_ips == ("203.0.113.7",)
    assert http.affinity == Affinity(client_ip=True, timeout_s=60)
    assert dns.protocol is Protocol.UDP and dns.node_port == 0


def test_default_affinity_timeout_is_three_hours() -> None:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("", 80)], session_affinity=True)
    (port,) = convert.service_ports(obj).ports
    assert port.affinity.timeout_s == 10800


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"clusterIP": "None"}, "headless"),
        ({"clusterIP": ""}, "no ClusterIP"),
        ({"type": "ExternalName", "externalName": "example.com"}, "ExternalName"),
    ],
)
def test_skipped_services(change: dict[str, Any], reason: str) -> None:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("", 80)])
    obj["spec"].update(change)
    result = convert.service_ports(obj)
    assert result.ports == () and reason in (result.skipped or "")


def test_sctp_port_is_refused_and_the_others_served() -> None:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("a", 80), ("b", 9000, "SCTP")])
    result = convert.service_ports(obj)
    assert [p.name.port for p in result.ports] == ["a"]
    assert result.problems == ("port 'b': SCTP is not supported by the userspace proxy",)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda o: o["spec"].update(clusterIP="10.96.0.999"),
            "clusterIP '10.96.0.999' is not an IP",
        ),
        (lambda o: o["spec"]["ports"][0].update(port=70000), "port 70000 is not a port number"),
        (lambda o: o["spec"]["ports"][0].update(nodePort="x"), "nodePort 'x'"),
        (lambda o: o["metadata"].pop("name"), "metadata.name is missing"),
        (lambda o: o.pop("spec"), "spec is missing"),
        (lambda o: o["spec"].update(ports="80"), "spec.ports is not a list"),
    ],
)
def test_invalid_services_name_the_object_and_reason(mutate: Any, message: str) -> None:
    obj = service("web", namespace="shop", cluster_ip="10.96.0.10", ports=[("http", 80)])
    mutate(obj)
    with pytest.raises(convert.InvalidObject, match=message) as info:
        convert.service_ports(obj)
    assert str(info.value).startswith("Service shop/")


def test_endpoint_slice_groups_by_port_and_keeps_conditions() -> None:
    obj = endpoint_slice(
        "web",
        addresses=["10.244.0.2", "10.244.0.3"],
        ports=[("http", 8080), ("dns", 5353, "UDP")],
        node_name="node-a",
    )
    obj["endpoints"][1]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    result = convert.endpoint_slice(obj)
    assert result.service == ("default", "web") and result.source == "web-slice"
    http = result.ports[("http", Protocol.TCP)]
    assert http[0] == EndpointInfo(Endpoint("10.244.0.2", 8080), node_name="node-a")
    assert http[1].ready is False and http[1].terminating is True
    assert ("dns", Protocol.UDP) in result.ports


def test_slice_without_service_label_or_with_fqdn_is_skipped() -> None:
    obj = endpoint_slice("web", addresses=["10.0.0.1"], ports=[("", 80)])
    obj["metadata"]["labels"] = {}
    assert convert.endpoint_slice(obj).skipped
    obj = endpoint_slice("web", addresses=["10.0.0.1"], ports=[("", 80)])
    obj["addressType"] = "FQDN"
    assert convert.endpoint_slice(obj).skipped


def test_core_endpoints_object() -> None:
    obj = {
        "kind": "Endpoints",
        "metadata": {"name": "web", "namespace": "default"},
        "subsets": [
            {
                "addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
                "notReadyAddresses": [{"ip": "10.0.0.9"}],
                "ports": [{"name": "p", "port": 1}, {"name": "q", "port": 2}],
            },
            {"addresses": [{"ip": "10.0.0.3"}], "ports": [{"name": "p", "port": 3}]},
        ],
    }
    result = convert.endpoints_object(obj)
    p = ServicePortName("default", "web", "p")
    assert usable_endpoints(list(result.ports[("p", Protocol.TCP)])) == [
        Endpoint("10.0.0.1", 1),
        Endpoint("10.0.0.2", 1),
        Endpoint("10.0.0.3", 3),
    ]
    assert len(result.ports[("q", Protocol.TCP)]) == 3  # two ready + one not ready
    assert str(p) == "default/web:p"


def test_usable_endpoints_prefer_ready_then_terminating() -> None:
    a, b, c = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)
    infos = [
        EndpointInfo(a, ready=True, node_name="n1"),
        EndpointInfo(b, ready=False, serving=True, terminating=True, node_name="n2"),
        EndpointInfo(c, ready=False, serving=False, terminating=True),
    ]
    assert usable_endpoints(infos) == [a]
    assert usable_endpoints(infos[1:]) == [b]
    assert usable_endpoints(infos[2:]) == []
    assert usable_endpoints(infos, local_node="n2") == [b]
    assert usable_endpoints(infos, local_node="n3") == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["spec"]["ports"][0].update(protocol="tcp"), "unknown protocol 'tcp'"),
        (lambda s: s["spec"].update(externalIPs=["0.0.0.0"]), "0.0.0.0 is unspecified"),
        (lambda s: s["spec"].update(externalIPs=["255.255.255.255"]), "broadcast"),
        (lambda s: s["spec"].update(externalIPs=["127.0.0.2"]), "loopback range"),
        (lambda s: s["spec"].update(externalIPs=["169.254.169.254"]), "link-local range"),
        (lambda s: s["spec"]["ports"].append(dict(s["spec"]["ports"][0])), "two ports named"),
        (lambda s: s["spec"]["ports"][0].update(name=["x"]), "port name"),
    ],
)
def test_what_the_api_server_would_refuse_is_refused(mutate: Any, message: str) -> None:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("http", 80)])
    mutate(obj)
    if "protocol" in message:  # a bad protocol refuses that port, not the Service
        assert any(message in p for p in convert.service_ports(obj).problems)
        return
    with pytest.raises(convert.InvalidObject, match=message):
        convert.service_ports(obj)


def test_slices_refuse_a_wrong_family_or_a_non_string_service_label() -> None:
    wrong = endpoint_slice("web", addresses=["fd00::1"], ports=[("http", 80)])
    wrong["addressType"] = "IPv4"
    with pytest.raises(convert.InvalidObject, match="not of addressType IPv4"):
        convert.endpoint_slice(wrong)
    odd = endpoint_slice("web", addresses=["10.0.0.1"], ports=[("http", 80)])
    odd["metadata"]["labels"][convert.SERVICE_NAME_LABEL] = ["web"]
    with pytest.raises(convert.InvalidObject, match="has an invalid value"):
        convert.endpoint_slice(odd)


@pytest.mark.parametrize("address", ["169.254.169.254", "0.0.0.0", "224.0.0.1", "fe80::1"])
def test_endpoint_addresses_the_api_server_refuses_are_refused(address: str) -> None:
    slc = endpoint_slice("web", addresses=[address], ports=[("http", 80)])
    with pytest.raises(convert.InvalidObject, match=f"endpoint address {address}"):
        convert.endpoint_slice(slc)


def test_loopback_endpoints_stay_allowed_for_backends_on_the_node() -> None:
    slc = endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", 80)])
    assert convert.endpoint_slice(slc).ports


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["metadata"].update(name="Web"), "metadata.name 'Web' is not a valid name"),
        (lambda s: s["metadata"].update(namespace="a.b"), "metadata.namespace"),
        (lambda s: s["metadata"].update(labels={"app": "x" * 64}), "invalid value"),
        (lambda s: s["spec"]["ports"][0].update(name="HTTP"), "not a valid port name"),
        (lambda s: s["spec"]["ports"][0].update(name="a" * 16), "not a valid port name"),
        (lambda s: s["spec"]["ports"][0].update(name="80"), "not a valid port name"),
    ],
)
def test_names_and_label_values_follow_the_api_servers_rules(change: Any, message: str) -> None:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("http", 80)])
    change(obj)
    with pytest.raises(convert.InvalidObject, match=message):
        convert.service_ports(obj)


# ---------------------------------------------------------------- dual-stack
def test_a_dual_stack_service_yields_a_service_port_per_family_with_its_own_addresses() -> None:
    obj = service(
        "web", cluster_ip="fd00:96::10", cluster_ips=["fd00:96::10", "10.96.0.10"],
        ports=[("http", 80)], external_ips=["203.0.113.7", "2001:db8::7"],
        load_balancer_ips=["198.51.100.1", "2001:db8::1"],
    )  # fmt: skip
    v6, v4 = convert.service_ports(obj).ports
    assert (v6.family, v6.cluster_ip, v4.family, v4.cluster_ip) == (
        Family.IPv6, "fd00:96::10", Family.IPv4, "10.96.0.10",
    )  # fmt: skip
    assert v6.external_ips == ("2001:db8::7",) and v4.external_ips == ("203.0.113.7",)
    assert v6.load_balancer_ips == ("2001:db8::1",) and v4.load_balancer_ips == ("198.51.100.1",)
    assert v6.name == v4.name


def test_a_single_stack_ipv6_service_drops_the_other_familys_external_ips() -> None:
    obj = service("web", cluster_ip="fd00:96::10", ports=[("http", 80)],
                  external_ips=["203.0.113.7"])  # fmt: skip
    (port,) = convert.service_ports(obj).ports
    assert port.family is Family.IPv6 and port.external_ips == ()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"clusterIPs": ["10.96.0.11"]}, "is not clusterIP"),
        ({"clusterIPs": ["10.96.0.10", "10.96.0.11"]}, "at most one address of each family"),
        ({"clusterIPs": ["10.96.0.10", "fd00::1"], "ipFamilies": ["IPv6", "IPv4"]}, "do not match"),
        ({"clusterIPs": ["10.96.0.10", "fd00::1", "fd00::2"]}, "at most one address"),
    ],
)
def test_mismatched_dual_stack_fields_are_refused(spec: dict[str, Any], message: str) -> None:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("http", 80)])
    obj["spec"].pop("ipFamilies")
    obj["spec"].update(spec)
    with pytest.raises(convert.InvalidObject, match=message):
        convert.service_ports(obj)


def test_a_service_without_cluster_ips_still_works() -> None:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("http", 80)])
    for field in ("clusterIPs", "ipFamilies", "ipFamilyPolicy"):
        obj["spec"].pop(field)
    (port,) = convert.service_ports(obj).ports
    assert port.cluster_ip == "10.96.0.10"


def test_an_ip_mode_proxy_ingress_gets_no_portal() -> None:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("http", 80)], type="LoadBalancer")
    obj["status"] = {"loadBalancer": {"ingress": [
        {"ip": "198.51.100.1", "ipMode": "VIP"},
        {"ip": "198.51.100.2", "ipMode": "Proxy"},
        {"ip": "198.51.100.3"},
        {"hostname": "lb.example.com"},
    ]}}  # fmt: skip
    (port,) = convert.service_ports(obj).ports
    assert port.load_balancer_ips == ("198.51.100.1", "198.51.100.3")
    obj["status"]["loadBalancer"]["ingress"][0]["ipMode"] = "Tunnel"
    with pytest.raises(convert.InvalidObject, match="ipMode"):
        convert.service_ports(obj)
