"""Building the userspace mode from the settings: portals on the host's iptables variant
(after clearing what another variant or mode left), and worker processes when asked."""

from __future__ import annotations

import os
from collections.abc import Callable

import structlog

from userproxy.iptables.detect import host_iptables
from userproxy.iptables.interface import RulesError
from userproxy.provider import StartupError
from userproxy.settings import Settings
from userproxy.userspace.portals import backends
from userproxy.userspace.portals.manager import PortalManager, detect_host_ip
from userproxy.userspace.portals.rules import PortalConfig
from userproxy.userspace.proxier import Proxier
from userproxy.userspace.workers import WorkerPool

log = structlog.get_logger("userproxy")


def make_provider(settings: Settings, *, take_over_rules: Callable[[], object]) -> Proxier:
    portals = make_portals(settings, take_over_rules) if portals_wanted(settings) else None
    workers = settings.userspace.workers
    followers = WorkerPool(workers, settings) if workers > 1 else None
    return Proxier(settings=settings, portals=portals, followers=followers)


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


def make_portals(settings: Settings, take_over_rules: Callable[[], object]) -> PortalManager:
    """A portal manager on the chosen backend, after clearing what the other variant may hold
    from an earlier run (rules of both variants would both be evaluated by the kernel), and
    what an earlier run in iptables mode left (a mode switch leaves nothing behind)."""
    host_ip = detect_host_ip() if settings.wildcard_bind else settings.bind_address
    config = PortalConfig(
        bind_address=settings.bind_address,
        host_ip=host_ip,
        nodeport_cidrs=settings.nodeport_addresses,
    )
    try:
        take_over_rules()
        iptables = backends.portal_iptables(settings.iptables.backend)
        for variant, host in host_iptables().items():
            if variant != iptables.variant:
                backends.cleanup(host)
    except RulesError as err:
        raise StartupError(f"cannot program iptables ({err})") from err
    return PortalManager(
        chains=backends.portal_sync(iptables),
        config=config,
        full_sync_period=settings.sync_period,
    )
