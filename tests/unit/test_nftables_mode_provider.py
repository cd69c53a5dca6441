"""The nftables-mode provider on the fake (no root): a first full sync, incremental syncs that
touch only the changed service, stale chains deleted a second later, repair of a deleted
table, failures that force a full rewrite, and element clashes between Services."""

from __future__ import annotations

import pytest

from tests.conftest import loopback_settings
from userproxy.model import Endpoint, ServicePort, ServicePortName
from userproxy.nftables.interface import NftError
from userproxy.nftables_mode import rules
from userproxy.nftables_mode.provider import NftablesProvider, cleanup
from userproxy.objects import endpoint_slice, service
from userproxy.sources.router import ObjectRouter
from userproxy.testing.nftfake import FakeNftables

WEB = ServicePort(ServicePortName("default", "web", "http"), "10.96.0.10", 80)


class Rig:
    def __init__(self) -> None:
        self.nft = FakeNftables()
        self.now = 100.0
        self.provider = NftablesProvider(
            settings=loopback_settings(mode="nftables", sync_period=30.0),
            nft=self.nft,
            clock=lambda: self.now,
        )
        self.router = ObjectRouter(self.provider)

    def serve(self, name: str, ip: str, *endpoints: str, **extra: object) -> None:
        self.router.upsert(service(name, cluster_ip=ip, ports=[("http", 80)], **extra))  # type: ignore[arg-type]
        self.router.upsert(endpoint_slice(name, addresses=list(endpoints), ports=[("http", 8080)]))

    def service_ips(self) -> dict[str, str]:
        return self.nft.elements(rules.SERVICE_IPS)


async def test_first_sync_writes_the_layout_and_every_service() -> None:
    rig = Rig()
    rig.serve("web", "10.96.0.10", "10.244.0.1", "10.244.0.2")
    rig.serve("api", "10.96.0.11")
    await rig.provider.sync()
    assert set(rules.FIXED_CHAINS) <= set(rig.nft.chains())
    assert rig.service_ips() == {"10.96.0.10 . tcp . 80": f"goto {rules.service_chain(WEB)}"}
    assert rig.nft.elements(rules.NO_ENDPOINT_SERVICES) == {
        "10.96.0.11 . tcp . 80": "goto reject-chain"
    }
    assert rig.nft.rules(rules.NAT_PREROUTING) == ["jump services"]
    status = rig.provider.status()
    assert status.mode == "nftables" and len(status.find("default/web:http").endpoints) == 2


async def test_a_change_rewrites_only_that_service() -> None:
    rig = Rig()
    for i in range(50):
        rig.serve(f"s{i}", f"10.96.1.{i}", "10.244.0.1")
    await rig.provider.sync()
    rig.now += 1
    rig.serve("s7", "10.96.1.7", "10.244.0.1", "10.244.0.9")
    await rig.provider.sync()
    partial = rig.nft.transactions[-1]
    assert "add table" not in partial and "s7/tcp/http" in partial
    assert not any(f"/s{i}/" in partial for i in range(50) if i != 7)
    chain = rig.nft.rules(rules.service_chain(ServicePort(
        ServicePortName("default", "s7", "http"), "10.96.1.7", 80)))  # fmt: skip
    assert chain[0].startswith("numgen random mod 2 == 0 goto endpoint-")


async def test_removed_endpoints_chains_are_deleted_a_second_later() -> None:
    rig = Rig()
    rig.serve("web", "10.96.0.10", "10.244.0.1", "10.244.0.2")
    await rig.provider.sync()
    gone = rules.endpoint_chain(WEB, Endpoint("10.244.0.2", 8080))
    rig.serve("web", "10.96.0.10", "10.244.0.1")
    rig.now += 0.1
    await rig.provider.sync()
    assert gone in rig.nft.chains() and rig.nft.rules(gone) == []  # flushed, not yet deleted
    rig.now += 0.5
    await rig.provider.sync()
    assert gone in rig.nft.chains()
    rig.now += 1.0
    await rig.provider.sync()
    assert gone not in rig.nft.chains()


async def test_a_deleted_service_leaves_nothing_behind() -> None:
    rig = Rig()
    rig.serve("web", "10.96.0.10", "10.244.0.1", session_affinity=True)
    await rig.provider.sync()
    assert any(s.startswith("affinity-") for s in rig.nft.sets())
    rig.router.delete(("Service", "default", "web"))
    rig.now += 0.1
    await rig.provider.sync()
    rig.now += 2
    await rig.provider.sync()
    assert rig.service_ips() == {} and rig.nft.elements(rules.CLUSTER_IPS) == {}
    assert not any(rules.is_service_chain(c) for c in rig.nft.chains())
    assert not any(s.startswith("affinity-") for s in rig.nft.sets())


async def test_the_periodic_full_sync_repairs_a_deleted_table() -> None:
    rig = Rig()
    rig.serve("web", "10.96.0.10", "10.244.0.1")
    await rig.provider.sync()
    rig.nft.delete_table()
    rig.now += 31
    await rig.provider.sync()
    assert rig.service_ips() == {"10.96.0.10 . tcp . 80": f"goto {rules.service_chain(WEB)}"}


async def test_a_refused_partial_update_is_rewritten_whole_at_once() -> None:
    rig = Rig()
    rig.serve("web", "10.96.0.10", "10.244.0.1")
    await rig.provider.sync()
    rig.serve("web", "10.96.0.10", "10.244.0.2")
    rig.nft.fail_next = "Error: Could not process rule: No such file or directory"
    rig.now += 1
    await rig.provider.sync()
    assert dict(rig.provider.status().failures)["nftables_sync"] == 1
    assert "add table" in rig.nft.transactions[-1]
    chain = rig.nft.rules(rules.service_chain(WEB))
    assert "10.244.0.2/8080" in chain[0]


async def test_a_refused_full_sync_fails_the_sync_and_the_retry_is_full() -> None:
    rig = Rig()
    rig.serve("web", "10.96.0.10", "10.244.0.1")
    rig.nft.fail_next = "Error: Could not process rule: Cannot allocate memory"
    with pytest.raises(NftError):
        await rig.provider.sync()  # the runner counts it and retries
    assert dict(rig.provider.status().failures)["nftables_sync"] == 1
    rig.now += 1
    await rig.provider.sync()
    assert "add table" in rig.nft.transactions[-1]
    assert rig.service_ips() == {"10.96.0.10 . tcp . 80": f"goto {rules.service_chain(WEB)}"}


async def test_an_element_two_services_claim_goes_to_the_first_and_survives_it() -> None:
    rig = Rig()
    rig.serve("a", "10.96.0.20", "10.244.0.1", external_ips=["192.0.2.1"])
    rig.serve("b", "10.96.0.21", "10.244.0.2", external_ips=["192.0.2.1"])
    await rig.provider.sync()
    key = "192.0.2.1 . tcp . 80"
    assert "/a/" in rig.service_ips()[key]
    rig.router.delete(("Service", "default", "a"))
    rig.now += 1
    await rig.provider.sync()
    assert "/b/" in rig.service_ips()[key]


async def test_cleanup_deletes_the_table() -> None:
    rig = Rig()
    rig.serve("web", "10.96.0.10", "10.244.0.1")
    await rig.provider.sync()
    assert cleanup(rig.nft) == 1 and not rig.nft.exists() and cleanup(rig.nft) == 0
