"""The fake iptables is only worth its tests if it accepts and refuses what the kernel does:
the same batches go to `iptables-legacy-restore` in a fresh namespace and to the fake, and
both must agree on what is accepted and on the chains and rule counts that result."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.netns.topology import bare, inside
from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.interface import Iptables, RulesError
from userproxy.iptables.text import flush_text, parse_batch
from userproxy.iptables_mode import rules as kernel_rules
from userproxy.iptables_mode.provider import KernelRuleWriter
from userproxy.model import Endpoint, ServicePort, ServicePortName
from userproxy.testing.fakes import FakeIptables
from userproxy.userspace.portals import backends
from userproxy.userspace.portals.rules import JUMPS, PortalConfig, PortalPort, build

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
CONFIG = PortalConfig(bind_address="0.0.0.0", host_ip="192.168.50.1")
WEB = ServicePort(ServicePortName("default", "web", "http"), "10.96.0.10", 80, node_port=30080)
API = ServicePort(ServicePortName("default", "api", "http"), "10.96.0.11", 80)


@pytest.fixture
def netns() -> Iterator[str]:
    with bare("f") as name:
        yield name


def shape(iptables: Iptables) -> dict[str, dict[str, int]]:
    """Per table, per chain, how many rules (the spelling of each rule differs: iptables-save
    reorders a rule's arguments)."""
    out: dict[str, dict[str, int]] = {}
    for table in ("filter", "nat"):
        [batch] = parse_batch(iptables.save(table))
        chains = {name: 0 for name in batch.declared}
        for op in batch.ops:
            chains[op.chain] += 1
        out[table] = chains
    return out


def both(netns: str, fake: FakeIptables, text: str, *, test_first: bool = False) -> bool:
    """Apply to both; assert they agree on accepting it. Returns whether it was accepted."""
    outcomes = []
    for target in ("real", "fake"):
        try:
            if target == "real":
                with inside(netns):
                    ExecIptables("legacy").restore(text, test_first=test_first)
            else:
                fake.restore(text, test_first=test_first)
            outcomes.append(True)
        except RulesError:
            outcomes.append(False)
    assert outcomes[0] == outcomes[1], f"real accepted: {outcomes[0]}, fake: {outcomes[1]}"
    return outcomes[0]


def real_shape(netns: str) -> dict[str, dict[str, int]]:
    with inside(netns):
        return shape(ExecIptables("legacy"))


def test_batches_are_accepted_and_refused_alike(netns: str) -> None:
    fake = FakeIptables("legacy")
    portal = build([PortalPort(WEB, 40001, True, True), PortalPort(API, 40002, False)], CONFIG)
    assert both(netns, fake, flush_text(portal, add_jumps=JUMPS), test_first=True)
    assert real_shape(netns) == shape(fake)
    # Deleting a rule that is not there, deleting a chain still referenced, appending to a
    # chain that does not exist, jumping to a chain that does not exist: all refused.
    refused = [
        "*nat\n-D KUBE-PORTALS-HOST -d 1.2.3.4/32 -j ACCEPT\nCOMMIT\n",
        "*nat\n-X KUBE-PORTALS-HOST\nCOMMIT\n",
        "*nat\n-A NO-SUCH-CHAIN -j ACCEPT\nCOMMIT\n",
        "*nat\n-A KUBE-PORTALS-HOST -j NO-SUCH-CHAIN\nCOMMIT\n",
    ]
    for text in refused:
        assert not both(netns, fake, text)
    # A two-table batch refused in its second table: without a test pass the first table
    # is committed, with one nothing is.
    half = "*filter\n:EXTRA - [0:0]\nCOMMIT\n*nat\n-A NO-SUCH-CHAIN -j ACCEPT\nCOMMIT\n"
    assert not both(netns, fake, half, test_first=True)
    assert real_shape(netns) == shape(fake)
    assert not both(netns, fake, half)
    assert "EXTRA" in shape(fake)["filter"]
    assert real_shape(netns) == shape(fake)
    # Cleanup leaves both with nothing of ours.
    with inside(netns):
        backends.cleanup(ExecIptables("legacy"))
    backends.cleanup(fake)
    assert real_shape(netns) == shape(fake)


def test_the_iptables_mode_writer_leaves_the_same_chains(netns: str) -> None:
    fake = FakeIptables("legacy")
    with inside(netns):
        real_writer = KernelRuleWriter(ExecIptables("legacy"))
    fake_writer = KernelRuleWriter(fake)
    eps = tuple(Endpoint(f"10.244.0.{i}", 8080) for i in (1, 2, 3))
    for backed, full in (
        ([kernel_rules.Backed(WEB, eps), kernel_rules.Backed(API, ())], True),
        ([kernel_rules.Backed(WEB, eps[:1])], False),
        ([kernel_rules.Backed(API, eps)], True),
    ):
        ruleset = kernel_rules.build(backed)
        with inside(netns):
            real_writer.apply(ruleset, full=full)
        fake_writer.apply(ruleset, full=full)
        assert real_shape(netns) == shape(fake)
