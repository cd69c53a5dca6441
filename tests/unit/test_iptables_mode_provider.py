"""The iptables-mode provider on a fake iptables (no root): full and partial writes, stale
chains, repair, kernel counters in the status, and cleanup that never touches chains it did
not write."""

from __future__ import annotations

from tests.conftest import loopback_settings
from userproxy.iptables_mode import rules
from userproxy.iptables_mode.provider import IptablesProvider, KernelRuleWriter, cleanup
from userproxy.model import Endpoint, ServicePort, ServicePortName
from userproxy.objects import endpoint_slice, service
from userproxy.sources.router import ObjectRouter
from userproxy.testing.fakes import FakeIptables

NAME = ServicePortName("default", "web", "http")
PORT = ServicePort(NAME, "10.96.0.10", 80)


class Rig:
    def __init__(self) -> None:
        self.iptables = FakeIptables()
        self.now = 0.0
        self.provider = IptablesProvider(
            settings=loopback_settings(mode="iptables", sync_period=30.0),
            writer=KernelRuleWriter(self.iptables),
            clock=lambda: self.now,
        )
        self.router = ObjectRouter(self.provider)

    def serve(self, *endpoints: str) -> None:
        self.router.upsert(service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]))
        self.router.upsert(endpoint_slice("web", addresses=list(endpoints), ports=[("http", 8080)]))

    def chains(self) -> set[str]:
        return set(self.iptables.tables["nat"])


async def test_first_sync_writes_the_chains_the_jumps_and_the_marker() -> None:
    rig = Rig()
    rig.serve("10.244.0.1", "10.244.0.2")
    await rig.provider.sync()
    nat = rig.iptables.tables["nat"]
    assert rules.service_chain(PORT) in nat and rules.MARKER in nat
    seps = {rules.endpoint_chain(PORT, Endpoint(f"10.244.0.{i}", 8080)) for i in (1, 2)}
    assert seps <= rig.chains()
    assert rig.iptables.rules("nat", "PREROUTING") == [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    ]
    await rig.provider.close()


async def test_an_endpoint_change_rewrites_only_what_changed_and_drops_the_stale_chain() -> None:
    rig = Rig()
    rig.serve("10.244.0.1", "10.244.0.2")
    await rig.provider.sync()
    rig.now = 1.0
    await rig.provider.sync()  # nothing changed: nothing written
    assert len(rig.iptables.restores) == 1
    rig.serve("10.244.0.1")
    rig.now = 2.0
    await rig.provider.sync()
    partial = rig.iptables.restores[-1]
    gone = rules.endpoint_chain(PORT, Endpoint("10.244.0.2", 8080))
    assert f"-X {gone}" in partial and ":KUBE-SERVICES" not in partial
    assert gone not in rig.chains()
    assert len(rig.iptables.rules("nat", rules.service_chain(PORT))) == 1
    await rig.provider.close()


async def test_the_periodic_full_sync_repairs_jumps_and_removes_leftover_chains() -> None:
    rig = Rig()
    leftover = "KUBE-SVC-LEFTOVERFROMBEFORE"
    rig.iptables.restore(f"*nat\n:{leftover} - [0:0]\nCOMMIT\n")
    rig.serve("10.244.0.1")
    await rig.provider.sync()
    assert leftover not in rig.chains()
    rig.iptables.tables["nat"]["PREROUTING"].clear()  # someone flushed PREROUTING
    rig.now = 10.0
    await rig.provider.sync()
    assert rig.iptables.rules("nat", "PREROUTING") == []  # a partial sync trusts the kernel
    rig.now = 40.0
    await rig.provider.sync()
    assert rig.iptables.rules("nat", "PREROUTING")[0].endswith("-j KUBE-SERVICES")
    await rig.provider.close()


async def test_status_reports_connections_the_kernel_counted() -> None:
    rig = Rig()
    rig.serve("10.244.0.1", "10.244.0.2")
    await rig.provider.sync()
    sep = rules.endpoint_chain(PORT, Endpoint("10.244.0.1", 8080))
    rig.iptables.packets[("nat", sep)] = 3  # both rules of the chain; only DNAT counts
    await rig.provider.read_counters()
    [port] = rig.provider.status().service_ports
    assert port.proxy_port is None and port.has_endpoints
    counted = {str(e.endpoint): e.kernel_connections for e in port.endpoints}
    assert counted == {"10.244.0.1:8080": 3, "10.244.0.2:8080": 0}
    assert all(e.counters is None for e in port.endpoints)
    await rig.provider.close()


async def test_cleanup_removes_our_chains_and_never_kube_proxys() -> None:
    theirs = FakeIptables()
    theirs.restore(
        "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n"
    )  # kube-proxy's own chains of the same names, no marker
    assert cleanup(theirs) == 0
    assert "KUBE-SERVICES" in theirs.tables["nat"]
    rig = Rig()
    rig.serve("10.244.0.1")
    await rig.provider.sync()
    assert cleanup(rig.iptables) > 0
    assert not any(rules.owned(c) for c in rig.chains())
    assert rig.iptables.rules("nat", "PREROUTING") == []
    assert cleanup(rig.iptables) == 0
    await rig.provider.close()


async def test_loopback_endpoints_are_left_out_of_the_kernel_rules() -> None:
    rig = Rig()
    rig.serve("127.0.0.1", "10.244.0.2")
    await rig.provider.sync()
    assert rules.endpoint_chain(PORT, Endpoint("10.244.0.2", 8080)) in rig.chains()
    assert rules.endpoint_chain(PORT, Endpoint("127.0.0.1", 8080)) not in rig.chains()
    (port,) = rig.provider.status().service_ports
    assert [e.endpoint for e in port.endpoints] == [Endpoint("10.244.0.2", 8080)]
    await rig.provider.close()
