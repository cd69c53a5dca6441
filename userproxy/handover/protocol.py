"""The hand-over messages: one JSON object per SOCK_SEQPACKET message, descriptors alongside.
Pure: encoding, decoding, version choice, and the names the sockets travel under."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from userproxy.model import Family, Protocol, ServicePortName

#: Protocol versions this build speaks; a giver picks the highest both sides know.
VERSIONS = (1,)
#: Descriptors per message: the kernel allows 253 (SCM_MAX_FD).
FDS_PER_MESSAGE = 200
#: Largest message either side sends or accepts.
MAX_MESSAGE = 1 << 16

LOCK = "lock"


class ProtocolError(ValueError):
    """The peer sent something this version cannot understand."""


@dataclass(frozen=True)
class Message:
    kind: str
    fields: dict[str, object]

    def get_int(self, key: str) -> int:
        value = self.fields.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{self.kind}: {key} is not an integer")
        return value

    def get_str(self, key: str) -> str:
        value = self.fields.get(key)
        if not isinstance(value, str):
            raise ProtocolError(f"{self.kind}: {key} is not a string")
        return value

    def get_strs(self, key: str) -> list[str]:
        value = self.fields.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProtocolError(f"{self.kind}: {key} is not a list of strings")
        return value


def encode(kind: str, **fields: object) -> bytes:
    data = json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{kind}: message of {len(data)} bytes is too large")
    return data


def decode(data: bytes) -> Message:
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise ProtocolError(f"not a JSON message: {err}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise ProtocolError("a message without a kind")
    kind = obj.pop("kind")
    return Message(kind, obj)


def choose_version(offered: Sequence[object], supported: Sequence[int] = VERSIONS) -> int | None:
    """The highest version both sides speak, or None."""
    common = {v for v in offered if isinstance(v, int)} & set(supported)
    return max(common) if common else None


#: Bytes of keys per message, leaving room for the JSON around them.
KEY_BYTES_PER_MESSAGE = MAX_MESSAGE - 4096


def chunks(keys: Sequence[str], size: int = FDS_PER_MESSAGE) -> Iterator[Sequence[str]]:
    """The socket keys in groups that fit one message each: at most `size` descriptors and
    KEY_BYTES_PER_MESSAGE of keys (a service port's key can reach ~350 bytes)."""
    group: list[str] = []
    used = 0
    for key in keys:
        cost = len(json.dumps(key)) + 1
        if group and (len(group) == size or used + cost > KEY_BYTES_PER_MESSAGE):
            yield group
            group, used = [], 0
        group.append(key)
        used += cost
    if group:
        yield group


# ---------------------------------------------------------------- names of the sockets
def _proto(protocol: Protocol, family: Family) -> str:
    """`TCP`, or `TCP6` for IPv6 (as netstat says it): the two families' sockets of one
    service port are distinct."""
    return f"{protocol.value}6" if family is Family.IPv6 else protocol.value


def listener_key(name: ServicePortName, protocol: Protocol, family: Family = Family.IPv4) -> str:
    return f"listener/{_proto(protocol, family)}/{name}"


def claim_key(protocol: Protocol, port: int, family: Family = Family.IPv4) -> str:
    return f"claim/{_proto(protocol, family)}/{port}"


def family_of_key(key: str) -> Family | None:
    """The family of a listener's or a claim's key; None for keys of neither."""
    kind, _, rest = key.partition("/")
    if kind not in ("listener", "claim"):
        return None
    return Family.IPv6 if rest.partition("/")[0].endswith("6") else Family.IPv4


def server_key(which: str) -> str:
    return f"server/{which}"
