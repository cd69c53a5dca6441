"""The PROXY protocol header (HAProxy's spec, versions 1 and 2) that tells a backend who the
client really is: a userspace proxy dials the endpoint from the node's address, so without it
the backend sees the node, not the client. Opt-in per Service (the annotation
`convert.PROXY_PROTOCOL_ANNOTATION`), TCP only.

Pure, apart from `original_destination`, which asks the kernel where the client was going
before a portal redirected it (the ClusterIP, NodePort or externalIP it dialled)."""

from __future__ import annotations

import ipaddress
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY_COMMAND = 0x21  # version 2, PROXY
_V2_TCP4, _V2_TCP6 = 0x11, 0x21
#: netfilter's SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6): both 80.
SO_ORIGINAL_DST = 80

Address = tuple[str, int]


def header(version: int, source: Address, destination: Address) -> bytes:
    """The header for a TCP connection from `source` to `destination` (same family)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:  # an IPv4-mapped peer, say: describe it as IPv6
        src, dst = _as_v6(src), _as_v6(dst)
    if version == 1:
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode()
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    family_byte = _V2_TCP4 if src.version == 4 else _V2_TCP6
    return (
        V2_SIGNATURE
        + bytes((_V2_PROXY_COMMAND, family_byte))
        + struct.pack("!H", len(addresses))
        + addresses
    )


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(f"::ffff:{address}")


def original_destination(sock: socket.socket) -> Address | None:
    """Where the client sent its SYN, before REDIRECT/DNAT; None without NAT (or without the
    conntrack entry, e.g. a direct connection to the proxy port)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            (port,) = struct.unpack_from("!H", raw, 2)
            return str(ipaddress.IPv6Address(raw[8:24])), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        (port,) = struct.unpack_from("!H", raw, 2)
        return socket.inet_ntoa(raw[4:8]), port
    except OSError:
        return None
