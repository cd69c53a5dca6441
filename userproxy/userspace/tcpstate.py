"""Noticing a reset on a TCP connection nobody is reading.

A relay stops reading one side while the other cannot take more data (backpressure). The event
loop then no longer polls that socket, so a reset from its peer goes unseen and the relay, with
both descriptors, would stay forever. A reset (or a timeout) puts the connection in the CLOSE
state, which TCP_INFO reports without reading; a paused side is looked at this way every
`PAUSED_CHECK_INTERVAL` seconds. A FIN (CLOSE_WAIT) is left for when reading resumes.
"""

from __future__ import annotations

import socket
from typing import Any

TCP_INFO = getattr(socket, "TCP_INFO", 11)
#: `tcpi_state` (the first byte of struct tcp_info) of a connection that is gone.
TCP_CLOSE = 7
#: Seconds between looks at a paused side (how long a reset there may go unnoticed).
PAUSED_CHECK_INTERVAL = 0.5


def connection_gone(sock: Any) -> bool:
    """Whether the connection of `sock` (a socket, or a transport's socket) is over."""
    if sock is None:
        return True
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0]
    except OSError:
        return True
    return bool(state == TCP_CLOSE)
