"""Where the portal rules are written: the iptables variant and implementation, chosen once
at start-up, and removing the portal chains from a variant.

- nft hosts: `iptables-nft-restore --noflush` batches (`iptables.exec`).
- legacy hosts: python-iptables (`iptables.iptc`), one commit per table per sync under the
  xtables lock; or, with `--iptables-backend legacy` and no libiptc, the legacy binaries.

`auto` follows the host (`iptables.detect`): rules of the two variants cannot be ordered
against each other, so the proxy must write where kubelet and the CNI write.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from userproxy.iptables.chains import ChainSync
from userproxy.iptables.cleanup import dumps, owned_text, remove_owned
from userproxy.iptables.detect import BackendChoice, choose_variant
from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.interface import Iptables
from userproxy.iptables.iptc import IptcIptables
from userproxy.iptables.rule import Ruleset
from userproxy.model import Family
from userproxy.userspace.portals.rules import (
    CHAINS,
    JUMPS,
    OWNED_CHAINS,
    PortalConfig,
    PortalPort,
    RuleBuilder,
)

log = structlog.get_logger("userproxy.iptables")


def portal_iptables(choice: BackendChoice, family: Family = Family.IPv4) -> Iptables:
    """The implementation portal rules are written with: python-iptables on legacy IPv4
    hosts, the variant's restore binary otherwise (`ip6tables-*-restore` for IPv6)."""
    variant = choose_variant(choice)
    iptables: Iptables
    if variant == "legacy" and family is Family.IPv4:
        iptables = IptcIptables()
    else:
        iptables = ExecIptables(variant, family)
    log.info("Programming portal rules.", backend=iptables.name, requested=choice,
             family=family.value)  # fmt: skip
    return iptables


def portal_sync(iptables: Iptables) -> ChainSync:
    """Keeps the portal chains and their jumps equal to each sync's ruleset."""
    return ChainSync(iptables, JUMPS)


class IptablesPortals:
    """The portals as KUBE-PORTALS-* / KUBE-NODEPORT-* chains (`PortalRules`)."""

    def __init__(self, iptables: Iptables, config: PortalConfig) -> None:
        self.iptables = iptables
        self.chains = portal_sync(iptables)
        self._builder = RuleBuilder(config)

    @property
    def name(self) -> str:
        return self.iptables.name

    @property
    def gaps_healed(self) -> int:
        return self.chains.jumps_restored

    def build(self, ports: Iterable[PortalPort]) -> Ruleset:
        return self._builder.build(ports)

    def apply(self, desired: Ruleset, *, full: bool) -> None:
        self.chains.apply(desired, full=full)

    def remove(self) -> int:
        return cleanup(self.iptables)


def cleanup(iptables: Iptables) -> int:
    """Remove the portal chains and jumps from one variant. Returns how many lines went."""
    return remove_owned(iptables, dumps(iptables, CHAINS), OWNED_CHAINS.__contains__)


def owned_rules_text(iptables: Iptables) -> str:
    """The portal rules in one variant, in iptables-save form."""
    return owned_text(iptables, dumps(iptables, CHAINS), OWNED_CHAINS.__contains__)
