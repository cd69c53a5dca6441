"""nftables transactions as data: the `nft -f` text they render, and the fake that applies
them with the kernel's refusals."""

from __future__ import annotations

import pytest

from userproxy.nftables.interface import NftError
from userproxy.nftables.transaction import (
    BaseChain,
    Chain,
    Element,
    NftFamily,
    Rule,
    Set,
    Table,
    Transaction,
)
from userproxy.testing.nftfake import FakeNftables

VMAP = Set("service-ips", "ipv4_addr . inet_proto . inet_service", "verdict", comment="dispatch")


def tx() -> Transaction:
    return Transaction(NftFamily.IP, "userproxy")


def test_objects_render_as_nft_commands() -> None:
    t = tx()
    t.add(Table("rules for userproxy"))
    t.add(Chain("nat-output", BaseChain("nat", "output", -100)))
    t.flush(Chain("nat-output"))
    t.add(VMAP)
    t.add(Set("affinity-x", "ipv4_addr", flags=("dynamic", "timeout"), timeout_s=10800))
    t.add(Rule("nat-output", "jump services", comment='say "hi"'))
    t.delete(Chain("stale"))
    assert t.text().splitlines() == [
        'add table ip userproxy { comment "rules for userproxy" ; }',
        "add chain ip userproxy nat-output"
        " { type nat hook output priority -100 ; policy accept ; }",
        "flush chain ip userproxy nat-output",
        "add map ip userproxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ;"
        ' comment "dispatch" ; }',
        "add set ip userproxy affinity-x { type ipv4_addr ; flags dynamic,timeout ;"
        " timeout 10800s ; }",
        "add rule ip userproxy nat-output jump services comment \"say 'hi'\"",
        "delete chain ip userproxy stale",
    ]


def test_consecutive_elements_of_one_container_share_a_command() -> None:
    t = tx()
    for port in ("80", "443"):
        t.add(Element("service-ips", ("10.96.0.1", "tcp", port), ("goto svc",), is_map=True))
    t.add(Element("cluster-ips", ("10.96.0.1",)))
    t.delete(Element("service-ips", ("10.96.0.2", "udp", "53"), ("goto x",), is_map=True))
    assert t.text().splitlines() == [
        "add element ip userproxy service-ips { 10.96.0.1 . tcp . 80 : goto svc,"
        " 10.96.0.1 . tcp . 443 : goto svc }",
        "add element ip userproxy cluster-ips { 10.96.0.1 }",
        "delete element ip userproxy service-ips { 10.96.0.2 . udp . 53 }",
    ]


def test_ip6_tables_are_named_by_family() -> None:
    t = Transaction(NftFamily.IP6, "userproxy")
    t.add(Table())
    assert t.text() == "add table ip6 userproxy\n"


def fake_with_table() -> FakeNftables:
    nft = FakeNftables()
    t = tx()
    t.add(Table())
    t.add(Chain("svc"))
    t.add(Chain("ep"))
    t.add(VMAP)
    t.add(Rule("svc", "goto ep"))
    t.add(Element("service-ips", ("10.0.0.1", "tcp", "80"), ("goto svc",), is_map=True))
    nft.run(t)
    return nft


@pytest.mark.parametrize(
    ("operation", "reason"),
    [
        (lambda t: t.add(Rule("svc", "goto missing")), "No such file"),
        (lambda t: t.add(Rule("nowhere", "accept")), "No such file"),
        (lambda t: t.add(Rule("svc", "ip daddr @nosuch accept")), "No such file"),
        (lambda t: t.delete(Chain("ep")), "busy"),  # svc jumps there
        (lambda t: t.delete(Chain("svc")), "busy"),  # a map element jumps there
        (lambda t: t.delete(Element("service-ips", ("10.0.0.9", "tcp", "80"))), "No such"),
        (
            lambda t: t.add(
                Element("service-ips", ("10.0.0.1", "tcp", "80"), ("goto ep",), is_map=True)
            ),
            "File exists",
        ),
        (lambda t: t.add(Set("service-ips", "ipv4_addr")), "File exists"),
    ],
)
def test_the_fake_refuses_what_nft_refuses_and_changes_nothing(
    operation: object, reason: str
) -> None:
    nft = fake_with_table()
    before = nft.listing()
    t = tx()
    t.add(Chain("new"))  # lands only if the whole transaction does
    operation(t)  # type: ignore[operator]
    with pytest.raises(NftError, match=reason):
        nft.run(t)
    assert nft.listing() == before and "new" not in nft.chains()


def test_a_chain_goes_with_its_rules_once_nothing_jumps_there() -> None:
    nft = fake_with_table()
    t = tx()
    t.delete(Element("service-ips", ("10.0.0.1", "tcp", "80")))
    t.delete(Chain("svc"))
    nft.run(t)
    assert nft.chains() == ["ep"] and nft.elements("service-ips") == {}
