"""A pod's backend: TCP and UDP on :8080, answering with the pod's name (TCP then echoes
until the client closes). Runs until killed."""

import asyncio
import socket
import sys

NAME = sys.argv[1].encode()


async def main() -> None:
    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(NAME + b"\n")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(NAME + b"\n", addr)  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    await asyncio.start_server(tcp, ["0.0.0.0", "::"], 8080)  # one socket per family
    await loop.create_datagram_endpoint(Udp, local_addr=("0.0.0.0", 8080))
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.bind(("::", 8080))
    await loop.create_datagram_endpoint(Udp, sock=v6)
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
