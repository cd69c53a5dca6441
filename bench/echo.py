"""A TCP echo server for the benchmark backends (uvloop, Protocol-level, no Python per byte
beyond the write)."""

import asyncio
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "0.0.0.0", port, backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()


uvloop.run(main(int(sys.argv[1])))
