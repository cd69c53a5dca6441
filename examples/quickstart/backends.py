"""Backends for examples/quickstart/services.yaml: an HTTP-ish server on 127.0.0.1, .2 and .3
port 18081 that says which one answered, and a UDP echo on 127.0.0.1:18053. Ctrl-C stops them."""

import asyncio


async def main() -> None:
    servers = []
    for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):

        async def answer(reader, writer, host=host):
            await reader.read(4096)
            body = f"hello from {host}\n".encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        servers.append(await asyncio.start_server(answer, host, 18081))

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    await asyncio.get_running_loop().create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 18053))
    print("backends up: tcp 127.0.0.{1,2,3}:18081, udp 127.0.0.1:18053")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
