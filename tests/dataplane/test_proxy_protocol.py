"""PROXY protocol headers for backends (opt-in per Service): the exact bytes of both versions
and families, and a real nginx (`listen ... proxy_protocol`) reading the client's address from
what the proxy sends."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import loopback_settings
from userproxy import UserProxy
from userproxy.convert import PROXY_PROTOCOL_ANNOTATION, InvalidObject, service_ports
from userproxy.objects import endpoint_slice, service
from userproxy.userspace.proxyproto import V2_SIGNATURE, header


def test_version_1_is_one_text_line() -> None:
    assert header(1, ("10.0.0.1", 40000), ("10.96.0.10", 80)) == (
        b"PROXY TCP4 10.0.0.1 10.96.0.10 40000 80\r\n"
    )
    assert header(1, ("fd00::1", 40000), ("fd00:96::10", 80)) == (
        b"PROXY TCP6 fd00::1 fd00:96::10 40000 80\r\n"
    )


def test_version_2_is_the_binary_layout() -> None:
    got = header(2, ("10.0.0.1", 40000), ("10.96.0.10", 80))
    assert got[:12] == V2_SIGNATURE and got[12:14] == b"\x21\x11"
    (length,) = struct.unpack("!H", got[14:16])
    assert length == 12 and len(got) == 16 + 12
    assert got[16:20] == socket.inet_aton("10.0.0.1") and got[20:24] == socket.inet_aton(
        "10.96.0.10"
    )
    assert struct.unpack("!HH", got[24:28]) == (40000, 80)
    six = header(2, ("fd00::1", 1), ("fd00:96::10", 2))
    assert six[13] == 0x21 and struct.unpack("!H", six[14:16]) == (36,) and len(six) == 52


def annotated(version: str, port: int) -> dict[str, object]:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("http", 80)])
    obj["metadata"]["annotations"] = {PROXY_PROTOCOL_ANNOTATION: version}  # type: ignore[index]
    return obj


def test_the_annotation_is_read_and_a_bad_value_refused() -> None:
    (port,) = service_ports(annotated("v2", 80)).ports
    assert port.proxy_protocol == 2
    with pytest.raises(InvalidObject, match=PROXY_PROTOCOL_ANNOTATION):
        service_ports(annotated("v3", 80))


NGINX = """
worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{
    listen 127.0.0.1:{port} proxy_protocol;
    location / {{
      return 200 "$proxy_protocol_addr $proxy_protocol_port
 $proxy_protocol_server_addr $proxy_protocol_server_port\\n";
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[int]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX.format(dir=tmp_path, port=port))
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # up to 5 s
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.skip(
                        f"nginx cannot run here: {proc.stderr.read() if proc.stderr else ''!r}"
                    )
                subprocess.run(["sleep", "0.05"], check=False)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def proxied(nginx: int) -> AsyncIterator[UserProxy]:
    proxy = UserProxy(loopback_settings())
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_sees_the_client_and_the_address_it_dialled(
    proxied: UserProxy, nginx: int, version: str
) -> None:
    await proxied.apply(
        annotated(version, 80),
        endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", nginx)]),
    )
    proxy_port = proxied.proxy_port("default/web:http")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    client_port = writer.get_extra_info("sockname")[1]
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    body = response.split(b"\r\n\r\n", 1)[1].decode().split()
    # No portal redirected it: the address dialled is the proxy port itself.
    assert body == ["127.0.0.1", str(client_port), "127.0.0.1", str(proxy_port)]


async def test_without_the_annotation_nothing_is_added(proxied: UserProxy) -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await proxied.apply(
        service("plain", cluster_ip="10.96.0.11", ports=[("http", 80)]),
        endpoint_slice("plain", addresses=["127.0.0.1"], ports=[("http", port)]),
    )
    _, writer = await asyncio.open_connection("127.0.0.1", proxied.proxy_port("default/plain:http"))
    writer.write(b"hello")
    await writer.drain()
    writer.close()
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.05)
    server.close()
    assert seen == [b"hello"]
