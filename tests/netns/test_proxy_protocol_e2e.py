"""PROXY protocol through the portals, in sealed namespaces: a pod's backend learns the real
client (a pod's address, not the node's) and the service address it dialled (the ClusterIP and
port, read with SO_ORIGINAL_DST), in both families."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from tests.netns import topology as topo
from tests.netns.procs import spawn, start_userproxy, stop_all
from userproxy.convert import PROXY_PROTOCOL_ANNOTATION
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
VIP, VIP6 = "10.96.0.50", "fd00:96::50"

#: A backend that reads a PROXY v2 header and answers with what it says.
READER = r"""
import ipaddress, socket, struct
servers = []
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 8081)); s.listen(); servers.append(s)
print("ready", flush=True)
import selectors
sel = selectors.DefaultSelector()
for s in servers: sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        head = b""
        while len(head) < 16: head += conn.recv(16 - len(head))
        size = struct.unpack("!H", head[14:16])[0]
        body = b""
        while len(body) < size: body += conn.recv(size - len(body))
        n = 4 if head[13] == 0x11 else 16
        src, dst = ipaddress.ip_address(body[:n]), ipaddress.ip_address(body[n:2*n])
        sport, dport = struct.unpack("!HH", body[2*n:2*n+4])
        conn.sendall(f"{src} {sport} {dst} {dport}\n".encode()); conn.close()
"""


async def test_a_pods_backend_learns_the_client_and_the_service_address(tmp_path: Path) -> None:
    ns = topo.create()
    procs = []
    try:
        backend = await spawn(ns["pod2"], sys.executable, "-c", READER)
        procs.append(backend)
        assert backend.stdout is not None
        assert await asyncio.wait_for(backend.stdout.readline(), 10) == b"ready\n"
        svc = service("web", cluster_ip=VIP, cluster_ips=[VIP, VIP6], ports=[("tcp", 80)])
        svc["metadata"]["annotations"] = {PROXY_PROTOCOL_ANNOTATION: "v2"}
        slices = [
            endpoint_slice("web", addresses=[topo.POD_IPS["pod2"]], ports=[("tcp", 8081)],
                           name="web-4"),
            endpoint_slice("web", addresses=[topo.POD_IPS6["pod2"]], ports=[("tcp", 8081)],
                           name="web-6"),
        ]  # fmt: skip
        path = tmp_path / "svc.yaml"
        path.write_text(yaml.safe_dump_all([svc, *slices]))
        procs.append(await start_userproxy(ns["node"], "--manifests", str(path)))
        loop = asyncio.get_running_loop()
        for family, vip, client in (
            (socket.AF_INET, VIP, topo.POD_IPS["pod1"]),
            (socket.AF_INET6, VIP6, topo.POD_IPS6["pod1"]),
        ):
            sock = topo.socket_in(ns["pod1"], socket.SOCK_STREAM, family)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (vip, 80)), 3)
                client_port = sock.getsockname()[1]
                answer = (await asyncio.wait_for(loop.sock_recv(sock, 200), 3)).decode().split()
            finally:
                sock.close()
            assert answer == [client, str(client_port), vip, "80"]
    finally:
        await stop_all(procs)
        topo.destroy(ns)
