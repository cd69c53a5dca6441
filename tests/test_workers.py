"""`userproxy run --workers 2`: two processes on the same proxy ports; a client IP stays on one
process, so ClientIP affinity holds; `ls` adds up both processes' counters."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import TcpBackend, udp_echo
from userproxy.objects import endpoint_slice, service
from userproxy.userspace.wire import decode_state, encode_state

CLIENT_IPS = [f"127.0.0.{i}" for i in range(1, 9)]


async def name_from(port: int, source: str) -> str:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 3)
        data = b""
        while not data.endswith(b"\n"):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 100), 3)
            assert chunk, "closed before the name arrived"
            data += chunk
        return data.decode().strip()
    finally:
        sock.close()


async def run_two_processes(manifests: Path) -> asyncio.subprocess.Process:
    """`userproxy run --workers 2` on these manifests, logging JSON to its stderr pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "userproxy", "run", "--manifests", str(manifests), "--workers", "2",
        "--portals", "off", "--healthz-bind-address", "", "--metrics-bind-address", "127.0.0.1:0",
        "--log-format", "json", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def both_processes_bound(port: int, ss_flags: str) -> None:
    """Wait until two processes hold the proxy port (`ss` flags pick TCP or UDP)."""

    async def holders() -> str:
        ss = await asyncio.create_subprocess_exec(
            "ss", ss_flags, f"sport = :{port}", stdout=asyncio.subprocess.PIPE
        )
        return (await ss.communicate())[0].decode()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (await holders()).count("users:") != 2:
        assert loop.time() < deadline, await holders()
        await asyncio.sleep(0.1)


async def test_two_workers_keep_affinity_and_report_every_connection(
    tmp_path: Path, backends: list[TcpBackend]
) -> None:
    manifest = [
        service("sticky", cluster_ip="10.96.0.10", ports=[("http", 80)], session_affinity=True),
        endpoint_slice(
            "sticky", addresses=["127.0.0.1"], ports=[("http", backends[0].port)], name="s1"
        ),
        endpoint_slice(
            "sticky", addresses=["127.0.0.1"], ports=[("http", backends[1].port)], name="s2"
        ),
    ]
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump_all(manifest))
    proc = await run_two_processes(path)
    metrics = ""
    try:
        assert proc.stderr is not None
        while True:
            event = json.loads(await asyncio.wait_for(proc.stderr.readline(), 15))
            if event["event"] == "Serving metrics.":
                metrics = event["address"]
            if event["event"] == "userproxy is running.":
                break

        async def status() -> dict:  # type: ignore[type-arg]
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://{metrics}/status") as response,
            ):
                return await response.json()  # type: ignore[no-any-return]

        (entry,) = (await status())["service_ports"]
        port = entry["proxy_port"]

        await both_processes_bound(port, "-Hltnp")
        loop = asyncio.get_running_loop()
        seen: dict[str, set[str]] = {}
        for _ in range(4):
            for ip in CLIENT_IPS:
                seen.setdefault(ip, set()).add(await name_from(port, ip))
        assert all(len(names) == 1 for names in seen.values()), seen  # affinity held
        assert {n for names in seen.values() for n in names} == {"pod1", "pod2"}

        async def total() -> int:
            return sum(e["total"] for e in (await status())["service_ports"][0]["endpoints"])

        deadline = loop.time() + 5
        while await total() != 4 * len(CLIENT_IPS):  # workers report every second
            assert loop.time() < deadline, await status()
            await asyncio.sleep(0.2)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{metrics}/metrics") as response,
        ):
            text = await response.text()
        connections = [
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "userproxy_connections_total"
        ]
        assert sum(connections) == 4 * len(CLIENT_IPS)  # /metrics adds the workers up too
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0


def test_state_round_trips() -> None:
    from userproxy.model import Affinity, Endpoint, ServicePort, ServicePortName

    port = ServicePort(ServicePortName("ns", "web", "http"), "10.96.0.1", 80,
                       affinity=Affinity(True, 60))  # fmt: skip
    state = [(port, 40000, [Endpoint("10.0.0.1", 8080)])]
    assert decode_state(encode_state(state)) == state


async def test_two_workers_udp_flows_keep_affinity_and_their_reply_source(tmp_path: Path) -> None:
    """UDP on the wildcard address with two processes: each client's flow stays in the process
    the reuseport program picked (its client socket lives there), affinity holds across new
    flows, and replies come from the address the client sent to."""
    echoes = [await udp_echo(prefix=f"pod{i}:".encode()) for i in (1, 2)]
    manifest = [
        service("dns", cluster_ip="10.96.0.10", ports=[("dns", 53, "UDP")], session_affinity=True),
        *(
            endpoint_slice(
                "dns", addresses=["127.0.0.1"], ports=[("dns", port, "UDP")], name=f"s{i}"
            )
            for i, (_, port) in enumerate(echoes)
        ),
    ]
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump_all(manifest))
    proc = await run_two_processes(path)
    try:
        assert proc.stderr is not None
        port = 0
        while True:
            event = json.loads(await asyncio.wait_for(proc.stderr.readline(), 15))
            if event["event"] == "Serving the service port.":
                port = event["proxy_port"]
            if event["event"] == "userproxy is running.":
                break
        await both_processes_bound(port, "-Hlunp")

        def ask(source: str, count: int) -> set[str]:
            names = set()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((source, 0))
                sock.settimeout(3)
                for i in range(count):
                    sock.sendto(b"q%d" % i, ("127.0.0.1", port))
                    reply, origin = sock.recvfrom(100)
                    assert origin == ("127.0.0.1", port) and reply.endswith(b":q%d" % i)
                    names.add(reply.split(b":")[0].decode())
            return names

        seen: dict[str, set[str]] = {}
        for _ in range(3):  # a new flow (source port) per round
            for ip in CLIENT_IPS:
                seen.setdefault(ip, set()).update(await asyncio.to_thread(ask, ip, 5))
        assert all(len(names) == 1 for names in seen.values()), seen  # affinity held
        assert {n for names in seen.values() for n in names} == {"pod1", "pod2"}
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        for transport, _ in echoes:
            transport.close()
