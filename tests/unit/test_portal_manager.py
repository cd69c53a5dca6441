"""The portal manager on fakes (no root): NodePort claims and clashes, full vs partial
writes, repair after outside edits, and cleanup of only what its backend owns."""

from __future__ import annotations

import pytest

from tests.helpers import wait_for
from userproxy.iptables.interface import RulesError
from userproxy.iptables.rule import Rule, Target
from userproxy.model import Protocol, ServicePort, ServicePortName
from userproxy.testing.fakes import FakeClaimer, FakeConntrack, FakeIptables
from userproxy.userspace.portals import backends
from userproxy.userspace.portals.conntrack import (
    delete_lines,
    service_destinations,
    unredirected_lines,
)
from userproxy.userspace.portals.interface import ActivePort
from userproxy.userspace.portals.manager import PortalManager
from userproxy.userspace.portals.rules import PortalConfig

CONFIG = PortalConfig(bind_address="0.0.0.0", host_ip="10.0.0.5")


def active(name: str, ip: str, proxy_port: int, *, node_port: int = 0) -> ActivePort:
    port = ServicePort(ServicePortName("ns", name, "http"), ip, 80, node_port=node_port)
    return ActivePort(port, proxy_port, has_endpoints=True)


def udp(name: str, ip: str, proxy_port: int) -> ActivePort:
    port = ServicePort(ServicePortName("ns", name, "dns", Protocol.UDP), ip, 53)
    return ActivePort(port, proxy_port, has_endpoints=True)


class Rig:
    def __init__(self, *, taken: set[tuple[Protocol, int]] | None = None) -> None:
        self.iptables = FakeIptables()
        self.claimer = FakeClaimer(taken=taken or set())
        self.conntrack = FakeConntrack()
        self.manager = PortalManager(
            rules=backends.IptablesPortals(self.iptables, CONFIG),
            config=CONFIG,
            full_sync_period=30.0,
            claimer=self.claimer,
            conntrack=self.conntrack,
        )
        self.now = 0.0
        self.manager.writer.clock = lambda: self.now

    def rules(self, chain: str, table: str = "nat") -> list[str]:
        return self.iptables.rules(table, chain)


WEB = active("web", "10.96.0.10", 40001, node_port=30080)
API = active("api", "10.96.0.11", 40002)


async def test_first_sync_writes_every_chain_and_the_jumps() -> None:
    rig = Rig()
    await rig.manager.sync([WEB, API])
    assert len(rig.rules("KUBE-PORTALS-CONTAINER")) == 2
    assert rig.rules("PREROUTING")[0].endswith("-j KUBE-PORTALS-CONTAINER")
    assert rig.rules("PREROUTING")[-1].endswith("-j KUBE-NODEPORT-CONTAINER")
    assert [r.split(" -j ")[-1] for r in rig.rules("INPUT", "filter")] == [
        "KUBE-USERPROXY-FILTER",
        "KUBE-NODEPORT-NON-LOCAL",
    ]
    assert rig.claimer.held == {(Protocol.TCP, 30080)}
    await rig.manager.close()


async def test_syncs_between_full_ones_write_only_the_difference() -> None:
    rig = Rig()
    await rig.manager.sync([WEB, API])
    rig.now = 5.0
    moved = active("api", "10.96.0.12", 40002)
    await rig.manager.sync([WEB, moved])
    partial = rig.iptables.restores[-1]
    assert ":KUBE-PORTALS-CONTAINER" not in partial  # no chain is flushed
    assert "-D KUBE-PORTALS-CONTAINER" in partial and "10.96.0.12" in partial
    assert "10.96.0.10" not in partial  # web did not change
    assert rig.manager.writer.full_writes == 1
    rig.now = 30.0
    await rig.manager.sync([WEB, moved])
    assert ":KUBE-PORTALS-CONTAINER - [0:0]" in rig.iptables.restores[-1]
    assert rig.manager.writer.full_writes == 2
    await rig.manager.close()


async def test_a_failed_write_makes_the_next_one_full() -> None:
    rig = Rig()
    await rig.manager.sync([WEB])
    rig.now = 40.0
    rig.iptables.fail_next = "xtables lock held"
    with pytest.raises(RulesError, match="xtables lock"):
        await rig.manager.sync([WEB, API])  # a full sync: nothing to fall back to
    rig.now = 41.0  # well inside the period: only the failure makes this one full
    await rig.manager.sync([WEB, API])
    assert ":KUBE-PORTALS-HOST - [0:0]" in rig.iptables.restores[-1]
    assert len(rig.rules("KUBE-PORTALS-HOST")) == 2
    await rig.manager.close()


async def test_a_partial_write_refused_is_retried_whole_at_once() -> None:
    rig = Rig()
    await rig.manager.sync([WEB])
    rig.now = 1.0
    rig.iptables.fail_next = "Resource temporarily unavailable"
    await rig.manager.sync([WEB, API])
    assert ":KUBE-PORTALS-HOST - [0:0]" in rig.iptables.restores[-1]
    assert len(rig.rules("KUBE-PORTALS-HOST")) == 2
    await rig.manager.close()


async def test_outside_deletions_are_repaired_at_the_next_full_sync() -> None:
    rig = Rig()
    await rig.manager.sync([WEB, API])
    want_input = rig.rules("INPUT", "filter")
    tables = rig.iptables.tables
    tables["nat"]["PREROUTING"].pop(0)  # someone deleted the portal jump
    tables["filter"]["INPUT"].pop(1)  # and NON-LOCAL's jump
    tables["filter"]["INPUT"].insert(0, "-s 198.51.100.7/32 -j DROP")  # not ours
    tables["nat"]["KUBE-PORTALS-HOST"].clear()
    rig.now = 40.0
    await rig.manager.sync([WEB, API])
    assert rig.rules("PREROUTING")[0].endswith("-j KUBE-PORTALS-CONTAINER")
    assert len(rig.rules("KUBE-PORTALS-HOST")) == 2
    # The guard must stay above NON-LOCAL: both are re-inserted, above the stranger's rule.
    assert rig.rules("INPUT", "filter") == [*want_input, "-A INPUT -s 198.51.100.7/32 -j DROP"]
    await rig.manager.close()


async def test_a_partial_write_that_cannot_delete_falls_back_to_full() -> None:
    rig = Rig()
    await rig.manager.sync([WEB, API])
    rig.iptables.tables["nat"]["KUBE-PORTALS-CONTAINER"].clear()  # deleted by someone else
    rig.now = 1.0
    await rig.manager.sync([WEB])
    assert len(rig.rules("KUBE-PORTALS-CONTAINER")) == 1
    assert "10.96.0.10" in rig.rules("KUBE-PORTALS-CONTAINER")[0]
    await rig.manager.close()


async def test_node_port_clash_and_taken_port_affect_only_that_service() -> None:
    rig = Rig(taken={(Protocol.TCP, 30090)})
    twin = active("twin", "10.96.0.20", 40003, node_port=30080)
    taken = active("taken", "10.96.0.21", 40004, node_port=30090)
    await rig.manager.sync([WEB, twin, taken, API])
    errors = rig.manager.node_port_errors()
    assert errors == {
        twin.port.name: "NodePort 30080/TCP is already used by ns/web:http",
        taken.port.name: "NodePort 30090/TCP is in use by another process",
    }
    node_port_rules = rig.rules("KUBE-NODEPORT-CONTAINER")
    assert len(node_port_rules) == 1 and "--to-ports 40001" in node_port_rules[0]
    assert len(rig.rules("KUBE-PORTALS-CONTAINER")) == 4  # every ClusterIP is still served
    # The owner goes away: the twin gets the port at the next sync.
    rig.now = 1.0
    await rig.manager.sync([twin, taken, API])
    assert twin.port.name not in rig.manager.node_port_errors()
    assert "--to-ports 40003" in rig.rules("KUBE-NODEPORT-CONTAINER")[0]
    await rig.manager.close()
    assert rig.claimer.held == set()


async def test_removed_udp_ports_are_flushed_in_one_batch_after_the_rule_write() -> None:
    rig = Rig()
    dns = [udp(f"dns{i}", f"10.96.1.{i}", 41000 + i) for i in range(1, 301)]
    await rig.manager.sync([WEB, *dns])
    for a in dns:
        await rig.manager.port_removed(a.port)
    await rig.manager.port_removed(WEB.port)  # TCP: nothing to flush
    assert rig.conntrack.flushed == []  # not before the rules stop sending traffic there
    rig.now = 1.0
    await rig.manager.sync([WEB])
    await wait_for(lambda: rig.conntrack.batches == 1, 2, "the flush")
    assert rig.conntrack.flushed == [a.port for a in dns]
    await rig.manager.close()


def test_the_conntrack_batch_names_every_address_of_a_port() -> None:
    port = ServicePort(
        ServicePortName("ns", "dns", "dns", Protocol.UDP),
        "10.96.0.53",
        53,
        node_port=30053,
        external_ips=("192.0.2.5", "2001:db8::5"),
    )
    assert delete_lines([port]) == [
        "-D -p udp --orig-dst 10.96.0.53 --orig-port-dst 53",
        "-D -p udp --orig-dst 192.0.2.5 --orig-port-dst 53",
        "-D -f ipv6 -p udp --orig-dst 2001:db8::5 --orig-port-dst 53",
        "-D -p udp --orig-port-dst 30053",
    ]


async def test_close_removes_only_what_its_backend_owns() -> None:
    rig = Rig()
    other = FakeIptables("legacy")
    await rig.manager.sync([WEB])
    other_portal = Rule("KUBE-PORTALS-HOST", Target("ACCEPT")).line
    other.restore(f"*nat\n:KUBE-PORTALS-HOST - [0:0]\n{other_portal}\nCOMMIT\n")
    rig.iptables.restore("*nat\n:SOMEONE-ELSE - [0:0]\n-A PREROUTING -j SOMEONE-ELSE\nCOMMIT\n")
    await rig.manager.close()
    assert backends.cleanup(rig.iptables) == 0  # nothing of ours is left
    nat = rig.iptables.tables["nat"]
    assert "KUBE-PORTALS-CONTAINER" not in nat and "SOMEONE-ELSE" in nat
    assert rig.rules("PREROUTING") == ["-A PREROUTING -j SOMEONE-ELSE"]
    assert other.tables["nat"]["KUBE-PORTALS-HOST"]  # the other variant was not touched


async def test_entries_made_while_the_rules_were_absent_are_flushed_once_they_are_back() -> None:
    rig = Rig()
    await rig.manager.sync([WEB, API])
    await wait_for(lambda: rig.conntrack.unredirected == [[WEB.port, API.port]], 2)
    rig.now = 1.0
    await rig.manager.sync([WEB, API])  # nothing was missing: no flush
    rig.iptables.tables["nat"]["PREROUTING"].clear()  # someone flushed the jumps
    rig.iptables.tables["nat"]["OUTPUT"].clear()
    rig.now = 40.0  # the next full sync heals them, then flushes
    await rig.manager.sync([WEB, API])
    await wait_for(lambda: len(rig.conntrack.unredirected) == 2, 2)
    await rig.manager.close()


LISTING = """\
tcp      6 119 SYN_SENT src=192.168.77.1 dst=10.96.0.10 sport=38570 dport=80 [UNREPLIED] src=10.96.0.10 dst=192.168.77.1 sport=80 dport=38570 mark=0 use=1
tcp      6 86399 ESTABLISHED src=10.244.0.2 dst=10.96.0.10 sport=41000 dport=80 src=10.0.0.5 dst=10.244.0.2 sport=40001 dport=41000 [ASSURED] mark=0 use=1
udp      17 29 src=192.168.77.1 dst=10.96.0.12 sport=5353 dport=53 [UNREPLIED] src=10.96.0.12 dst=192.168.77.1 sport=53 dport=5353 mark=0 use=1
tcp      6 119 SYN_SENT src=192.168.77.9 dst=10.0.0.5 sport=5000 dport=30080 [UNREPLIED] src=10.0.0.5 dst=192.168.77.9 sport=30080 dport=5000 mark=0 use=1
tcp      6 119 SYN_SENT src=192.168.77.1 dst=10.1.1.1 sport=6000 dport=80 [UNREPLIED] src=10.1.1.1 dst=192.168.77.1 sport=80 dport=6000 mark=0 use=1
"""  # noqa: E501


def test_unredirected_entries_are_recognised_by_their_reply_source() -> None:
    wanted = service_destinations([WEB.port, udp("dns", "10.96.0.12", 1).port])
    assert unredirected_lines(LISTING, wanted) == [
        "-D -p tcp -s 192.168.77.1 -d 10.96.0.10 --sport 38570 --dport 80",  # gap entry
        "-D -p udp -s 192.168.77.1 -d 10.96.0.12 --sport 5353 --dport 53",
        "-D -p tcp -s 192.168.77.9 -d 10.0.0.5 --sport 5000 --dport 30080",  # the NodePort
    ]  # the redirected connection and the unrelated address stay


async def test_close_keeping_the_rules_leaves_them_for_the_successor() -> None:
    rig = Rig()
    await rig.manager.sync([WEB])
    await rig.manager.close(keep_rules=True)
    assert rig.rules("KUBE-PORTALS-CONTAINER") and not rig.claimer.held
