"""The health-check port of a LoadBalancer Service from outside the node, with the real
`userproxy run` in sealed namespaces: an external client (a cloud load balancer's probe) sees
200 and this node's endpoint count."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.netns import topology as topo
from tests.netns.procs import start_backends, start_userproxy, stop_all
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
HEALTH_PORT = 32100


async def test_a_load_balancer_probe_sees_this_nodes_endpoints(tmp_path: Path) -> None:
    ns = topo.create()
    procs = []
    try:
        procs += await start_backends(ns)
        lb = service("web", cluster_ip="10.96.0.60", ports=[("http", 80)], type="LoadBalancer")
        lb["spec"].update(externalTrafficPolicy="Local", healthCheckNodePort=HEALTH_PORT)
        here = endpoint_slice("web", addresses=list(topo.POD_IPS.values()),
                              ports=[("http", 8080)], node_name="node-a")  # fmt: skip
        path = tmp_path / "svc.yaml"
        path.write_text(yaml.safe_dump_all([lb, here]))
        procs.append(await start_userproxy(
            ns["node"], "--manifests", str(path), "--hostname-override", "node-a"
        ))  # fmt: skip
        probe = (
            "import urllib.request, urllib.error\n"
            f"try: r = urllib.request.urlopen('http://{topo.NODE_IP}:{HEALTH_PORT}/', timeout=3)\n"
            "except urllib.error.HTTPError as e: r = e\n"
            "print(r.status, r.read().decode())\n"
        )
        out = await asyncio.to_thread(topo.run_in, ns["ext"], "python3", "-c", probe)
        code, body = out.split(" ", 1)
        assert code == "200"
        assert json.loads(body) == {
            "service": {"namespace": "default", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": True,
        }
    finally:
        await stop_all(procs)
        topo.destroy(ns)
