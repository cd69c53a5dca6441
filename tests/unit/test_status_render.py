"""`userproxy ls`: the policies in force are said per service port."""

from __future__ import annotations

from userproxy.model import ServicePort, ServicePortName
from userproxy.provider import ProxyStatus, ServicePortStatus
from userproxy.serving.status import render, to_json


def test_ls_says_when_external_traffic_is_dropped_for_lack_of_local_endpoints() -> None:
    name = ServicePortName("ns", "web", "http")
    port = ServicePort(name, "10.96.0.10", 80, node_port=30080, external_local=True,
                       health_check_node_port=32000, proxy_protocol=2)  # fmt: skip
    status = ProxyStatus("userspace", (ServicePortStatus(port, 40000, True, local_endpoints=0),))
    text = render(to_json(status))
    assert "etp=Local (0 local endpoints: dropping external traffic)" in text
    assert "healthCheckNodePort 32000" in text and "PROXY protocol v2" in text


def test_the_readme_sample_is_what_ls_prints() -> None:
    from pathlib import Path

    from userproxy.model import Affinity, Endpoint
    from userproxy.provider import CountersSnapshot, EndpointStatus

    port = ServicePort(ServicePortName("default", "web", "http"), "10.96.0.10", 80,
                       node_port=30080, load_balancer_ips=("10.96.100.1",),
                       affinity=Affinity(client_ip=True))  # fmt: skip
    counters = CountersSnapshot(active=2, total=3, bytes_from_clients=0, bytes_to_clients=18)
    endpoint = EndpointStatus(Endpoint("127.0.0.1", 32873), counters=counters)
    status = ProxyStatus("userspace", (ServicePortStatus(port, 40305, True, (endpoint,)),))
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    sample = readme.split("```\nProt VirtualAddress:Port", 1)[1].split("```", 1)[0]
    assert render(to_json(status)).strip() == ("Prot VirtualAddress:Port" + sample).strip()
