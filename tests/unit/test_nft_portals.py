"""The nftables portals (`--portals-backend nftables`) on the fake: the elements of every path,
partial writes of only what changed, repair of a deleted table (and the conntrack flush that
follows a gap), and cleanup."""

from __future__ import annotations

from tests.helpers import wait_for
from userproxy.model import Family, Protocol, ServicePort, ServicePortName
from userproxy.nftables.transaction import NftFamily
from userproxy.testing.fakes import FakeClaimer, FakeConntrack
from userproxy.testing.nftfake import FakeNftables
from userproxy.userspace.portals import nftrules as n
from userproxy.userspace.portals.interface import ActivePort
from userproxy.userspace.portals.manager import PortalManager
from userproxy.userspace.portals.nftwriter import NftPortals
from userproxy.userspace.portals.rules import PortalConfig

CONFIG = PortalConfig(bind_address="0.0.0.0", host_ip="10.0.0.5")


def web(**extra: object) -> ServicePort:
    return ServicePort(ServicePortName("ns", "web", "http"), "10.96.0.10", 80, **extra)  # type: ignore[arg-type]


class Rig:
    def __init__(self, config: PortalConfig = CONFIG) -> None:
        self.nft = FakeNftables(NftFamily.of(config.family), n.TABLE)
        self.conntrack = FakeConntrack()
        self.manager = PortalManager(
            rules=NftPortals(self.nft, n.ElementBuilder(config)),
            config=config,
            claimer=FakeClaimer(),
            conntrack=self.conntrack,
        )
        self.now = 0.0
        self.manager.writer.clock = lambda: self.now

    def elements(self, name: str) -> dict[str, str]:
        return self.nft.elements(name)


async def test_every_path_is_one_element() -> None:
    rig = Rig()
    port = web(node_port=30080, external_ips=("192.0.2.7",), load_balancer_ips=("198.51.100.1",))
    await rig.manager.sync([ActivePort(port, 40001, has_endpoints=True)])
    assert rig.elements(n.PORTALS) == {
        "10.96.0.10 . tcp . 80": "40001",
        "198.51.100.1 . tcp . 80": "40001",
        "192.0.2.7 . tcp . 80": "40001",
    }
    assert rig.elements(n.PORTALS_HOST) == {
        "10.96.0.10 . tcp . 80": "10.0.0.5 . 40001",
        "198.51.100.1 . tcp . 80": "10.0.0.5 . 40001",
    }
    assert rig.elements(n.PORTALS_HOST_LOCAL) == {"192.0.2.7 . tcp . 80": "10.0.0.5 . 40001"}
    assert rig.elements(n.NODEPORTS) == {"tcp . 30080": "40001"}
    assert rig.elements(n.PROXY_PORTS) == {"tcp . 40001": ""}
    assert rig.elements(n.REFUSED_PORTS) == {}
    assert any("redirect to : ip daddr" in r for r in rig.nft.rules(n.NAT_PREROUTING))
    await rig.manager.close(keep_rules=True)


async def test_refusal_drops_source_ranges_and_a_specific_bind_address() -> None:
    rig = Rig(PortalConfig(bind_address="10.0.0.5", host_ip="10.0.0.5"))
    empty = ServicePort(ServicePortName("ns", "empty", "dns", Protocol.UDP), "10.96.0.11", 53)
    ranged = web(load_balancer_ips=("198.51.100.1",), source_ranges=("203.0.113.0/24",),
                 node_port=30080, external_local=True)  # fmt: skip
    await rig.manager.sync([
        ActivePort(empty, 40002, has_endpoints=False),
        ActivePort(ranged, 40001, True, external_proxy_port=40003, has_local_endpoints=False),
    ])  # fmt: skip
    assert rig.elements(n.REFUSED_PORTS) == {"udp . 40002": ""}
    assert rig.elements(n.DROPPED_PORTS) == {"tcp . 40003": ""}
    assert rig.elements(n.PORTALS_RANGED) == {
        "198.51.100.1 . tcp . 80 . 203.0.113.0/24": "10.0.0.5 . 40003"
    }
    assert rig.elements(n.FIREWALLED) == {"198.51.100.1 . tcp . 80": ""}
    assert rig.elements(n.NODEPORTS) == {"tcp . 30080": "10.0.0.5 . 40003"}
    assert any("dnat ip to ip daddr" in r for r in rig.nft.rules(n.NAT_PREROUTING))
    await rig.manager.close(keep_rules=True)


async def test_partial_writes_carry_only_the_changed_elements() -> None:
    rig = Rig()
    ports = [ActivePort(ServicePort(ServicePortName("ns", f"s{i}", "http"), f"10.96.1.{i}", 80),
                        41000 + i, has_endpoints=True) for i in range(100)]  # fmt: skip
    await rig.manager.sync(ports)
    rig.now = 1.0
    ports[5] = ActivePort(ports[5].port, 42000, has_endpoints=False)
    await rig.manager.sync(ports)
    partial = rig.nft.transactions[-1]
    assert "add table" not in partial and partial.count("\n") == 7, partial
    assert rig.elements(n.PORTALS)["10.96.1.5 . tcp . 80"] == "42000"
    assert rig.elements(n.REFUSED_PORTS) == {"tcp . 42000": ""}
    await rig.manager.close(keep_rules=True)


async def test_a_deleted_table_comes_back_and_bypassing_entries_are_flushed() -> None:
    rig = Rig()
    active = [ActivePort(web(), 40001, has_endpoints=True)]
    await rig.manager.sync(active)
    await wait_for(lambda: len(rig.conntrack.unredirected) == 1, 2)  # the first write is a gap
    rig.nft.delete_table()
    rig.now = 31.0
    await rig.manager.sync(active)
    assert rig.elements(n.PORTALS) == {"10.96.0.10 . tcp . 80": "40001"}
    await wait_for(lambda: len(rig.conntrack.unredirected) == 2, 2)
    await rig.manager.close()
    assert not rig.nft.exists()  # closing without a successor removes the portals


async def test_a_partial_write_that_fails_is_rewritten_whole() -> None:
    rig = Rig()
    await rig.manager.sync([ActivePort(web(), 40001, has_endpoints=True)])
    state = rig.nft.state
    assert state is not None
    state.elements[n.PORTALS].clear()  # someone deleted our element
    rig.now = 1.0
    await rig.manager.sync([ActivePort(web(), 40009, has_endpoints=True)])
    assert rig.elements(n.PORTALS) == {"10.96.0.10 . tcp . 80": "40009"}
    await rig.manager.close(keep_rules=True)


async def test_ipv6_table() -> None:
    config = PortalConfig(bind_address="::", host_ip="fd00::5", family=Family.IPv6)
    rig = Rig(config)
    port = ServicePort(ServicePortName("ns", "web6", "http"), "fd00:96::10", 80)
    await rig.manager.sync([ActivePort(port, 40001, has_endpoints=True)])
    assert rig.elements(n.PORTALS_HOST) == {"fd00:96::10 . tcp . 80": "fd00::5 . 40001"}
    assert any("ip6 daddr != ::1" in r for r in rig.nft.rules(n.NAT_PREROUTING))
    await rig.manager.close(keep_rules=True)


async def test_an_element_two_ports_claim_goes_to_the_first_then_to_the_next() -> None:
    rig = Rig()
    a = ActivePort(ServicePort(ServicePortName("ns", "a", "http"), "10.96.0.20", 80,
                               external_ips=("192.0.2.9",)), 40001, has_endpoints=True)  # fmt: skip
    b = ActivePort(ServicePort(ServicePortName("ns", "b", "http"), "10.96.0.21", 80,
                               external_ips=("192.0.2.9",)), 40002, has_endpoints=True)  # fmt: skip
    await rig.manager.sync([a, b])
    assert rig.elements(n.PORTALS)["192.0.2.9 . tcp . 80"] == "40001"
    rig.now = 1.0
    await rig.manager.sync([b])
    assert rig.elements(n.PORTALS)["192.0.2.9 . tcp . 80"] == "40002"
    assert "10.96.0.20 . tcp . 80" not in rig.elements(n.PORTALS)
    rig.now = 2.0
    await rig.manager.sync([])
    assert rig.elements(n.PORTALS) == {}
    await rig.manager.close(keep_rules=True)
