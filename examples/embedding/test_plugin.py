"""The same, with the pytest plugin that ships with userproxy (no fixture to write): the
`userproxy` fixture is a running proxy on 127.0.0.1 for sync tests (and async ones), and
`userproxy_async` one on the test's own loop (with pytest-asyncio).

Run with `python -m pytest examples/embedding` (CI runs it with the rest of the tests).
"""

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest


class Named(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline().decode()
        self.wfile.write(f"{self.server.name}: {line}".encode())  # type: ignore[attr-defined]


@pytest.fixture
def backends() -> Iterator[dict[str, int]]:
    servers = {}
    for name in ("blue", "green"):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Named)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield {name: s.server_address[1] for name, s in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def ask(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(line.encode() + b"\n")
        return sock.makefile().readline().strip()


def test_blue_green_switch_with_the_plugin(userproxy, backends: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    port = userproxy.serve("shop", backends=[("127.0.0.1", backends["blue"])])
    assert ask(port, "hi") == "blue: hi"
    # Serving the name again replaces its backends; the proxy port stays.
    assert userproxy.serve("shop", backends=[("127.0.0.1", backends["green"])]) == port
    assert ask(port, "hi again") == "green: hi again"
    assert userproxy.counters("shop").total == 2


async def test_the_async_fixture(userproxy_async, backends: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    port = await userproxy_async.serve("shop", backends=[("127.0.0.1", backends["blue"])])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello\n")
    assert await reader.readline() == b"blue: hello\n"
    writer.close()
