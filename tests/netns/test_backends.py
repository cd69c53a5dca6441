"""Both rule backends against the real kernel, each in a fresh private network namespace:
apply, re-apply, change, repair after outside edits, atomic refusal, cleanup, others' rules."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.netns.topology import bare, inside
from userproxy import main
from userproxy.iptables.chains import ChainSync
from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.interface import RulesError, Variant
from userproxy.iptables.iptc import IptcIptables
from userproxy.iptables.text import owned_lines
from userproxy.model import Protocol, ServicePort, ServicePortName
from userproxy.userspace.portals import backends
from userproxy.userspace.portals.rules import (
    CHAINS,
    OWNED_CHAINS,
    PortalConfig,
    PortalPort,
    Rule,
    Ruleset,
    Target,
    build,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
CONFIG = PortalConfig(bind_address="0.0.0.0", host_ip="192.168.50.1")

MAKERS: dict[str, tuple[Variant, Callable[[], ChainSync]]] = {
    "restore-legacy": ("legacy", lambda: backends.portal_sync(ExecIptables("legacy"))),
    "restore-nft": ("nft", lambda: backends.portal_sync(ExecIptables("nft"))),
    "python-iptables": ("legacy", lambda: backends.portal_sync(IptcIptables())),
}


@pytest.fixture
def netns() -> Iterator[str]:
    with bare("b") as name:
        yield name


@pytest.fixture(params=sorted(MAKERS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ruleset(*services: tuple[str, str, int, bool]) -> Ruleset:
    """(name, cluster IP, node port, has endpoints) per service: one TCP and one UDP port."""
    ports = []
    for i, (name, ip, node_port, has_endpoints) in enumerate(services):
        for j, protocol in enumerate(Protocol):
            port = ServicePort(
                ServicePortName("default", name, protocol.value.lower(), protocol),
                ip,
                80,
                node_port=node_port,
                external_ips=("192.168.50.1",),
            )
            ports.append(PortalPort(port, 40000 + 10 * i + j, has_endpoints, True))
    return build(ports, CONFIG)


WEB = ("web", "10.96.0.10", 30080, True)
EMPTY = ("empty", "10.96.0.11", 0, False)


def saved(netns: str, variant: Variant) -> dict[str, list[str]]:
    """Every non-comment line of each table, counters left out (they move with traffic)."""
    with inside(netns):
        texts = {t: ExecIptables(variant).save(t) for t in CHAINS}
    return {
        t: [ln.split(" [")[0] for ln in text.splitlines() if not ln.startswith("#")]
        for t, text in texts.items()
    }


def ipt(netns: str, variant: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, f"iptables-{variant}", *args], check=True)


def apply(netns: str, kind: str, rules: Ruleset) -> None:
    with inside(netns):
        MAKERS[kind][1]().apply(rules)


def rule_lines(state: dict[str, list[str]], chain: str) -> list[str]:
    return [ln for table in state.values() for ln in table if ln.startswith(f"-A {chain} ")]


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Ruleset], list[str]]:
    """What iptables-legacy-restore makes of a ruleset in a clean namespace: the yardstick
    every backend's result is compared with, in iptables-save's own spelling."""

    def make(rules: Ruleset) -> list[str]:
        with bare("r") as name:
            apply(name, "restore-legacy", rules)
            return owned(name, "legacy")

    return make


def owned(netns: str, variant: Variant) -> list[str]:
    dump = "\n".join(itertools.chain(*saved(netns, variant).values()))
    return owned_lines(dump, OWNED_CHAINS.__contains__)


def test_apply_then_reapply_changes_nothing(netns: str, kind: str, reference: Callable) -> None:
    variant = MAKERS[kind][0]
    rules = ruleset(WEB, EMPTY)
    apply(netns, kind, rules)
    first = saved(netns, variant)
    assert owned(netns, variant) == reference(rules)
    assert len(rule_lines(first, "KUBE-PORTALS-CONTAINER")) == 2 * (1 + 2) + 2 * (1 + 2)
    apply(netns, kind, rules)
    assert saved(netns, variant) == first  # no duplicate rule, no duplicate jump


def test_change_replaces_exactly(netns: str, kind: str, reference: Callable) -> None:
    variant = MAKERS[kind][0]
    apply(netns, kind, ruleset(WEB, EMPTY))
    moved = ("empty", "10.96.0.12", 0, True)
    apply(netns, kind, ruleset(moved))
    assert owned(netns, variant) == reference(ruleset(moved))
    assert "10.96.0.10" not in "\n".join(owned(netns, variant))


def test_outside_edits_are_repaired_and_jumps_keep_their_order(
    netns: str, kind: str, reference: Callable
) -> None:
    variant = MAKERS[kind][0]
    rules = ruleset(WEB, EMPTY)
    apply(netns, kind, rules)
    ipt(netns, variant, "-t", "nat", "-D", "KUBE-PORTALS-CONTAINER", "1")
    ipt(netns, variant, "-t", "nat", "-F", "KUBE-NODEPORT-HOST")
    ipt(netns, variant, "-t", "nat", "-D", "PREROUTING", "1")  # the portal jump
    # NON-LOCAL's jump goes; re-inserting only it at the top would put it above the guard.
    ipt(netns, variant, "-D", "INPUT", "2")
    ipt(netns, variant, "-I", "INPUT", "1", "-s", "198.51.100.7", "-j", "DROP")  # not ours
    apply(netns, kind, rules)
    assert owned(netns, variant) == reference(rules)
    state = saved(netns, variant)
    assert [ln.split(" -j ")[-1] for ln in rule_lines(state, "INPUT")] == [
        "KUBE-USERPROXY-FILTER",
        "KUBE-NODEPORT-NON-LOCAL",
        "DROP",
    ]
    prerouting = [ln.split(" -j ")[-1] for ln in rule_lines(state, "PREROUTING")]
    assert prerouting == ["KUBE-PORTALS-CONTAINER", "KUBE-NODEPORT-CONTAINER"]


def test_a_batch_with_a_bad_rule_changes_nothing(netns: str, kind: str) -> None:
    variant = MAKERS[kind][0]
    apply(netns, kind, ruleset(WEB))
    before = saved(netns, variant)
    bad = ruleset(EMPTY)
    # The filter table is written first: the bad rule is in nat, after filter was built.
    bad.add(Rule("KUBE-PORTALS-HOST", Target("DNAT", to_destination="999.1.1.1:80")))
    with pytest.raises(RulesError, match=r"999\.1\.1\.1"):
        apply(netns, kind, bad)
    assert saved(netns, variant) == before


def test_cleanup_removes_ours_only_and_twice_is_fine(netns: str, kind: str) -> None:
    variant = MAKERS[kind][0]
    ipt(netns, variant, "-t", "nat", "-N", "SOMEONE-ELSE")
    ipt(netns, variant, "-t", "nat", "-A", "PREROUTING", "-d", "10.1.1.1", "-j", "SOMEONE-ELSE")
    apply(netns, kind, ruleset(WEB, EMPTY))
    with inside(netns):
        assert main.remove_rules() > 0
        assert main.remove_rules() == 0
    assert owned(netns, "legacy") == [] and owned(netns, "nft") == []
    nat = saved(netns, variant)["nat"]
    assert ":SOMEONE-ELSE -" in nat
    assert "-A PREROUTING -d 10.1.1.1/32 -j SOMEONE-ELSE" in nat


def test_partial_updates_write_only_the_difference(
    netns: str, kind: str, reference: Callable
) -> None:
    variant, make = MAKERS[kind]
    moved = ("empty", "10.96.0.12", 0, True)
    with inside(netns):
        backend = make()
        backend.apply(ruleset(WEB, EMPTY))
        ipt(netns, variant, "-t", "nat", "-D", "KUBE-PORTALS-HOST", "1")  # web's, not changing
        backend.apply(ruleset(WEB, moved), full=False)
    assert len(owned(netns, variant)) == len(reference(ruleset(WEB, moved))) - 1
    with inside(netns):
        backend.apply(ruleset(WEB, moved), full=True)  # the periodic full sync heals
    assert owned(netns, variant) == reference(ruleset(WEB, moved))
    ipt(netns, variant, "-t", "nat", "-F", "KUBE-PORTALS-CONTAINER")
    with inside(netns):  # a partial update that cannot delete what it expects falls back
        backend.apply(ruleset(WEB), full=False)
    assert owned(netns, variant) == reference(ruleset(WEB))


def test_reading_and_cleaning_never_creates_legacy_tables() -> None:
    """On an nft node, detection, cleanup and `rules` read legacy only where it exists:
    creating its tables would make every iptables-save on the node warn."""
    from userproxy.iptables.detect import detect_variant, host_iptables

    with bare("l") as name:
        with inside(name):
            assert detect_variant(host_iptables()) == "nft"
            main.remove_rules()
            main.owned_rules_text()
            backends.portal_sync(ExecIptables("nft")).apply(ruleset(WEB))
            main.remove_rules()
        tables = subprocess.run(
            ["ip", "netns", "exec", name, "cat", "/proc/net/ip_tables_names"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    assert tables.split() == []
