"""Keeping a client on one worker process (`--workers`): ClientIP affinity across processes.

The kernel would spread a client's connections over a SO_REUSEPORT group by 4-tuple hash. A
classic-BPF reuseport program makes it pick the socket by the client's IPv4 address instead
(`ld [net+12]; mod N`; for IPv6 the last 32 bits of the source, `ld [net+20]`), so one client
always lands in the same process, whose balancer holds its affinity. A program that returns an
index the group does not have (a worker being replaced) makes the kernel fall back to its hash.
"""

from __future__ import annotations

import ctypes
import socket

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


#: Where the (low 32 bits of the) source address sit in the network header.
SOURCE_OFFSET = {socket.AF_INET: 12, socket.AF_INET6: 20}


def steer_by_client_ip(sock: socket.socket, workers: int) -> None:
    """Attach the reuseport program choosing socket `src_ip mod workers` of the group."""
    offset = SOURCE_OFFSET[sock.family]
    program = (_SockFilter * 3)(
        _SockFilter(_BPF_LD_W_ABS, 0, 0, (SKF_NET_OFF + offset) & 0xFFFFFFFF),
        _SockFilter(_BPF_ALU_MOD_K, 0, 0, workers),
        _SockFilter(_BPF_RET_A, 0, 0, 0),
    )
    fprog = _SockFprog(3, program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
