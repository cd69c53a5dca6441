"""Which iptables variant the host uses, the way kube-proxy's iptables wrappers decide:
kubelet's hint chains first, then whichever variant already holds more rules, nft when there
is nothing to go on (legacy and nft rules cannot be ordered against each other)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.interface import VARIANTS, Iptables, Variant
from userproxy.model import Family

BackendChoice = Literal["auto", "legacy", "nft"]

HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


def rule_count(iptables: Iptables) -> int:
    return sum(
        line.startswith("-A ")
        for table in ("filter", "nat", "mangle")
        for line in iptables.save(table).splitlines()
    )


def detect_variant(candidates: Mapping[Variant, Iptables]) -> Variant:
    for variant in ("nft", "legacy"):
        mangle = candidates[variant].save("mangle")
        if any(f":{hint} " in mangle for hint in HINT_CHAINS):
            return variant
    return "legacy" if rule_count(candidates["legacy"]) > rule_count(candidates["nft"]) else "nft"


def host_iptables(family: Family = Family.IPv4) -> dict[Variant, Iptables]:
    """The host's two variants, through their binaries (for reading, detection, cleanup)."""
    return {variant: ExecIptables(variant, family) for variant in VARIANTS}


def choose_variant(choice: BackendChoice) -> Variant:
    """`auto` follows the host; otherwise the variant asked for."""
    return detect_variant(host_iptables()) if choice == "auto" else choice
