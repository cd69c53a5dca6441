"""What the leader and its worker processes (`--workers`) say to each other over their
socketpair: one JSON line per message. Pure.

  leader -> worker   the data plane: per service port, its proxy port, affinity, endpoints;
                     or "drain" (after a hand-over: accept nothing new)
  worker -> leader   the worker's traffic counters, per service port and endpoint
"""

from __future__ import annotations

import dataclasses
import json

from userproxy.model import Affinity, Endpoint, Protocol, ServicePort, ServicePortName
from userproxy.provider import Counters, CountersSnapshot

#: leader -> worker: a successor serves the proxy ports; accept nothing new, keep relaying.
DRAIN = b'"drain"\n'

#: Per served service port: the port, its proxy port and its endpoints (what workers follow).
DataPlane = list[tuple[ServicePort, int, list[Endpoint]]]


def encode_state(ports: DataPlane) -> bytes:
    items = [
        {
            "ns": p.name.namespace,
            "name": p.name.name,
            "port": p.name.port,
            "protocol": p.protocol.value,
            "cluster_ip": p.cluster_ip,
            "service_port": p.port,
            "affinity": [p.affinity.client_ip, p.affinity.timeout_s],
            "proxy_protocol": p.proxy_protocol,
            "proxy_port": proxy_port,
            "endpoints": [[e.ip, e.port] for e in endpoints],
        }
        for p, proxy_port, endpoints in ports
    ]
    return json.dumps(items, separators=(",", ":")).encode() + b"\n"


def decode_state(line: bytes) -> DataPlane:
    out = []
    for item in json.loads(line):
        name = ServicePortName(item["ns"], item["name"], item["port"], Protocol(item["protocol"]))
        port = ServicePort(
            name,
            item["cluster_ip"],
            item["service_port"],
            affinity=Affinity(bool(item["affinity"][0]), int(item["affinity"][1])),
            proxy_protocol=int(item.get("proxy_protocol", 0)),
        )
        out.append(
            (port, int(item["proxy_port"]), [Endpoint(ip, p) for ip, p in item["endpoints"]])
        )
    return out


def encode_counters(counters: Counters) -> bytes:
    body = {
        name: [[e.ip, e.port, *dataclasses.astuple(c)] for e, c in eps.items()]
        for name, eps in counters.items()
    }
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode_counters(line: bytes) -> Counters:
    return {
        name: {Endpoint(ip, port): CountersSnapshot(*values) for ip, port, *values in rows}
        for name, rows in json.loads(line).items()
    }
