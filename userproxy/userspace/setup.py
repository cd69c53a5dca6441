"""Building the userspace mode from the settings: portals on the host's iptables variant
(after clearing what another variant or mode left), and worker processes when asked."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import structlog

from userproxy.dualstack import DualStack, settings_for
from userproxy.handover.adoption import Adoption
from userproxy.iptables.detect import host_iptables, rule_count
from userproxy.iptables.interface import RulesError
from userproxy.model import Family
from userproxy.nftables.detect import nft_tables
from userproxy.nftables.exec import ExecNftables, nft_available
from userproxy.nftables.interface import NftError
from userproxy.nftables.transaction import NftFamily
from userproxy.provider import StartupError
from userproxy.settings import Settings
from userproxy.userspace.portals import backends, nftrules
from userproxy.userspace.portals.claims import SocketClaimer
from userproxy.userspace.portals.interface import PortalRules
from userproxy.userspace.portals.manager import PortalManager, detect_host_ip
from userproxy.userspace.portals.nftwriter import NftPortals
from userproxy.userspace.portals.rules import PortalConfig
from userproxy.userspace.proxier import Proxier
from userproxy.userspace.workers import WorkerPool

log = structlog.get_logger("userproxy")


def make_provider(
    settings: Settings, *, take_over_rules: Callable[[], object], adoption: Adoption | None = None
) -> DualStack:
    """A proxier per address family (the other family's made when first needed).
    `adoption`: the sockets and proxy ports inherited from a predecessor, if any."""
    adoption = adoption or Adoption()
    wanted = portals_wanted(settings)
    primary = settings.bind_family
    parts = {family: adoption.part(family) for family in Family}

    def build(family: Family, family_settings: Settings) -> Proxier:
        portals = None
        if wanted:
            owner = take_over_rules if family is primary else lambda: None
            portals = make_portals(family_settings, owner, parts[family], family)
        workers = settings.userspace.workers
        followers = WorkerPool(workers, family_settings) if workers > 1 else None
        if followers is not None and portals is not None:  # a node's proxy, not a test's
            migrate_queued_connections()
        return Proxier(
            settings=family_settings, portals=portals, followers=followers, adoption=parts[family]
        )

    def factory(family: Family) -> Proxier | str:
        family_settings = settings_for(settings, family)
        if isinstance(family_settings, str):
            return family_settings
        try:
            return build(family, family_settings)
        except StartupError as err:
            return str(err)

    return DualStack(build(primary, settings), primary, factory)


#: With it, connections queued on a listener that closes move to another listener of its
#: SO_REUSEPORT group instead of being reset (Linux 5.14+): workers leave their groups when
#: a successor takes over, and a worker that dies leaves its queue behind.
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migrate_queued_connections() -> None:
    try:
        if MIGRATE_REQ.read_text().strip() != "1":
            MIGRATE_REQ.write_text("1\n")
            log.info("Set net.ipv4.tcp_migrate_req=1: queued connections of a closing worker "
                     "listener move to the others.")  # fmt: skip
    except OSError as err:
        log.warning("Cannot set net.ipv4.tcp_migrate_req; connections queued on a worker "
                    "that stops accepting will be reset.", reason=str(err))  # fmt: skip


def portals_wanted(settings: Settings) -> bool:
    choice = settings.userspace.portals
    if choice == "off":
        return False
    if os.geteuid() != 0:
        if choice == "on":
            raise StartupError("--portals on writes iptables rules: run it as root")
        log.warning("Not root: running without portals; connect to the proxy ports.")
        return False
    return True


def make_portals(
    settings: Settings,
    take_over_rules: Callable[[], object],
    adoption: Adoption | None = None,
    family: Family = Family.IPv4,
) -> PortalManager:
    """A portal manager on the chosen backend, after clearing what the other variant may hold
    from an earlier run (rules of both variants would both be evaluated by the kernel), and
    what an earlier run in iptables mode left (a mode switch leaves nothing behind)."""
    host_ip = detect_host_ip(family) if settings.wildcard_bind else settings.bind_address
    config = PortalConfig(
        bind_address=settings.bind_address,
        host_ip=host_ip,
        nodeport_cidrs=settings.nodeport_addresses,
        family=family,
    )
    try:
        take_over_rules()
        rules = portal_rules(settings, config)
    except (RulesError, NftError) as err:
        raise StartupError(f"cannot program {family.tool} ({err})") from err
    return PortalManager(
        rules=rules,
        config=config,
        full_sync_period=settings.sync_period,
        claimer=SocketClaimer(adoption, family),
    )


def portal_rules(settings: Settings, config: PortalConfig) -> PortalRules:
    """The portals on the chosen backend, after removing what the other backends (another
    iptables variant, or the nftables table) hold from an earlier run: the kernel would
    evaluate both."""
    family = config.family
    nft = ExecNftables(NftFamily.of(family), nftrules.TABLE) if nft_available() else None
    if portals_backend(settings) == "nftables":
        if nft is None:
            raise StartupError("--portals-backend nftables needs the nft binary: install nftables")
        for host in host_iptables(family).values():
            backends.cleanup(host)
        log.info("Programming portal rules.", backend=nft.name, family=family.value)
        return NftPortals(nft, nftrules.ElementBuilder(config))
    iptables = backends.portal_iptables(settings.iptables.backend, family)
    for variant, host in host_iptables(family).items():
        if variant != iptables.variant:
            backends.cleanup(host)
    if nft is not None:
        nft.delete_table()
    return backends.IptablesPortals(iptables, config)


def portals_backend(settings: Settings) -> str:
    """`auto`: nftables where the host uses nftables natively (it has tables iptables-nft did
    not make, or our portal table from an earlier run) and holds no iptables rules; iptables
    everywhere else, so hosts that use iptables keep the old chains."""
    choice = settings.userspace.portals_backend
    if choice != "auto":
        return choice
    tables = nft_tables()
    if not tables:
        return "iptables"
    if any(name == nftrules.TABLE for _, name in tables):
        return "nftables"
    if any(rule_count(host) for host in host_iptables(Family.IPv4).values()):
        return "iptables"
    return "nftables"
