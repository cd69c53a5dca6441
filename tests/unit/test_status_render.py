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
