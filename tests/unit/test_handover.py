"""The hand-over pieces without a proxy: the messages, the journal, the adoption pool, and
the giver and taker talking over a real UNIX socket (success, refusal, a taker that vanishes,
a peer that sends garbage)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from userproxy.handover.adoption import Adoption
from userproxy.handover.channel import Channel
from userproxy.handover.giver import HandoverServer
from userproxy.handover.journal import PortJournal
from userproxy.handover.protocol import (
    FDS_PER_MESSAGE,
    ProtocolError,
    choose_version,
    chunks,
    decode,
    encode,
    listener_key,
)
from userproxy.handover.taker import Inheritance, Refused, take_over
from userproxy.model import Protocol, ServicePortName


def test_messages_round_trip_and_garbage_is_a_protocol_error() -> None:
    message = decode(encode("hello", versions=[1], pid=7, mode="userspace"))
    assert message.kind == "hello" and message.get_int("pid") == 7
    for bad in (b"", b"[]", b"{}", b"not json", b'{"kind": 5}'):
        with pytest.raises(ProtocolError):
            decode(bad)
    with pytest.raises(ProtocolError):
        message.get_str("pid")


def test_the_highest_common_version_wins() -> None:
    assert choose_version([1, 2, 3], supported=(1, 2)) == 2
    assert choose_version([3, "x", None], supported=(1, 2)) is None
    assert choose_version([], supported=(1,)) is None


def test_keys_travel_in_chunks_small_enough_for_one_message() -> None:
    keys = [f"k{i}" for i in range(2 * FDS_PER_MESSAGE + 3)]
    groups = list(chunks(keys))
    assert [len(g) for g in groups] == [FDS_PER_MESSAGE, FDS_PER_MESSAGE, 3]
    name = ServicePortName("a" * 63, "b" * 253, "c" * 15, Protocol.UDP)
    biggest = [listener_key(name, Protocol.UDP)] * (3 * FDS_PER_MESSAGE)
    groups = list(chunks(biggest))
    assert sum(len(g) for g in groups) == len(biggest)
    for group in groups:
        encode("sockets", keys=list(group))  # never too large


def test_the_journal_survives_garbage_and_rewrites_only_on_change(tmp_path: Path) -> None:
    journal = PortJournal(tmp_path / "ports.json")
    assert journal.load() == {}
    journal.save({"listener/TCP/default/web:http": 40000})
    assert PortJournal(journal.path).load() == {"listener/TCP/default/web:http": 40000}
    stamp = journal.path.stat().st_mtime_ns
    journal.save({"listener/TCP/default/web:http": 40000})
    assert journal.path.stat().st_mtime_ns == stamp
    garbage = ["{", "[]", '{"version": 2, "ports": {"c": 80}}', '{"version": 1, "ports": 5}']
    for text in garbage:
        journal.path.write_text(text)
        assert PortJournal(journal.path).load() == {}
    journal.path.write_text('{"version": 1, "ports": {"a": 0, "b": true, "c": 80, "d": 70000}}')
    assert PortJournal(journal.path).load() == {"c": 80}


def test_adoption_hands_each_socket_out_once_and_closes_the_rest() -> None:
    a, b = socket.socket(), socket.socket()
    adoption = Adoption({"x": a, "y": b}, ports={"z": 41000})
    assert adoption.take("x") is a and adoption.take("x") is None
    assert adoption.port("z") == 41000
    assert adoption.close_rest() == 1 and b.fileno() == -1
    assert adoption.port("z") is None
    a.close()


class FakeGiver:
    mode = "userspace"

    def __init__(self, fds: Sequence[tuple[str, int]]) -> None:
        self.fds = list(fds)
        self.calls: list[str] = []

    def handover_fds(self) -> list[tuple[str, int]]:
        return self.fds

    async def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    async def release(self) -> None:
        self.calls.append("release")


@pytest.fixture
def listeners() -> list[socket.socket]:
    socks = []
    for _ in range(FDS_PER_MESSAGE + 5):  # more than one message's worth
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        socks.append(sock)
    yield socks
    for sock in socks:
        sock.close()


async def test_a_hand_over_passes_every_socket_then_releases(
    tmp_path: Path, listeners: list[socket.socket]
) -> None:
    giver = FakeGiver([(f"listener/{i}", s.fileno()) for i, s in enumerate(listeners)])
    server = HandoverServer(tmp_path / "h", giver)
    await server.start()
    got = await take_over(tmp_path / "h", mode="userspace")
    assert isinstance(got, Inheritance) and got.peer_pid == os.getpid()
    adoption = got.adoption()
    for i, original in enumerate(listeners):
        sock = adoption.take(f"listener/{i}")
        assert sock is not None and sock.getsockname() == original.getsockname()
        sock.close()
    assert giver.calls == ["pause"]
    await got.confirm()
    await asyncio.wait_for(server.handed_over.wait(), 5)
    assert giver.calls == ["pause", "release"]
    await server.close()


async def test_a_taker_that_vanishes_before_serving_leaves_the_giver_as_it_was(
    tmp_path: Path, listeners: list[socket.socket]
) -> None:
    giver = FakeGiver([("listener/0", listeners[0].fileno())])
    server = HandoverServer(tmp_path / "h", giver)
    await server.start()
    got = await take_over(tmp_path / "h", mode="userspace")
    assert isinstance(got, Inheritance)
    got.abandon()  # the successor died during its first sync
    for _ in range(100):
        if giver.calls == ["pause", "resume"]:
            break
        await asyncio.sleep(0.02)
    assert giver.calls == ["pause", "resume"]
    assert not server.handed_over.is_set()
    # A second successor can still take over.
    again = await take_over(tmp_path / "h", mode="userspace")
    assert isinstance(again, Inheritance)
    await again.confirm()
    await asyncio.wait_for(server.handed_over.wait(), 5)
    again.abandon()
    await server.close()


async def test_an_incompatible_successor_is_refused_and_the_giver_steps_aside(
    tmp_path: Path,
) -> None:
    giver = FakeGiver([])
    server = HandoverServer(tmp_path / "h", giver)
    await server.start()
    got = await take_over(tmp_path / "h", mode="iptables")
    assert isinstance(got, Refused) and "mode" in got.reason
    await asyncio.wait_for(server.stepped_aside.wait(), 5)
    assert giver.calls == []
    await server.close()


async def test_garbage_on_the_socket_changes_nothing(tmp_path: Path) -> None:
    giver = FakeGiver([])
    server = HandoverServer(tmp_path / "h", giver)
    await server.start()
    for payload in (b"junk", encode("sockets", keys=[]), b""):
        channel = await Channel.connect(str(tmp_path / "h"))
        if payload:
            channel.sock.send(payload)
        channel.close()
        await asyncio.sleep(0.05)
    assert giver.calls == [] and not server.stepped_aside.is_set()
    got = await take_over(tmp_path / "h", mode="userspace")
    assert isinstance(got, Inheritance)
    got.abandon()
    await server.close()


async def test_nobody_listening_means_a_cold_start(tmp_path: Path) -> None:
    assert await take_over(tmp_path / "absent", mode="userspace") is None


NOBODY_HELLO = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
try:
    s.send(b'{"kind":"hello","versions":[1],"pid":1,"mode":"userspace"}')
    data, fds, _, _ = socket.recv_fds(s, 65536, 10)
except (BrokenPipeError, ConnectionResetError):
    data, fds = b"", []
print(len(data), len(fds))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
async def test_another_user_gets_nothing_even_through_an_open_socket_file(
    listeners: list[socket.socket],
) -> None:
    giver = FakeGiver([("listener/0", listeners[0].fileno())])
    with tempfile.TemporaryDirectory(dir="/tmp") as where:  # a directory nobody may enter
        path = Path(where) / "h"
        os.chmod(where, 0o755)
        server = HandoverServer(path, giver)
        await server.start()
        os.chmod(path, 0o666)  # as if the permissions were wrong
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", NOBODY_HELLO, str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert out.split() == [b"0", b"0"], err  # closed without a word, no descriptor
        assert giver.calls == []
        await server.close()
