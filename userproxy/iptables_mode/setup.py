"""Building the iptables mode from the settings: on the host's iptables variant, after
removing the userspace mode's portals and any iptables-mode rules in the other variant."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import structlog

from userproxy.handover.adoption import Adoption
from userproxy.iptables.detect import choose_variant, host_iptables
from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.interface import RulesError
from userproxy.iptables_mode import provider as iptables_mode
from userproxy.iptables_mode.provider import IptablesProvider, KernelRuleWriter
from userproxy.iptables_mode.rules import KernelConfig
from userproxy.provider import StartupError
from userproxy.settings import Settings

log = structlog.get_logger("userproxy")


def make_provider(
    settings: Settings, *, take_over_rules: Callable[[], object], adoption: Adoption | None = None
) -> IptablesProvider:
    """`adoption` is unused: the kernel serves, there are no listening sockets to inherit."""
    if os.geteuid() != 0:
        raise StartupError("proxy-mode iptables writes kernel rules: run it as root")
    try:
        variant = choose_variant(settings.iptables.backend)
        writer = KernelRuleWriter(ExecIptables(variant))
        take_over_rules()  # one instance per node; the userspace mode's portals go
        for other, host in host_iptables().items():
            if other != variant:
                iptables_mode.cleanup(host)
    except RulesError as err:
        raise StartupError(f"cannot program iptables ({err})") from err
    log.info("Running in iptables mode.", backend=writer.iptables.name)
    if _sysctl("net/ipv4/ip_forward") == "0":
        log.warning(
            "net.ipv4.ip_forward is 0: the kernel will drop service traffic it DNATs to "
            "other hosts or pods; a Kubernetes node needs it set to 1."
        )
    config = KernelConfig(masquerade_all=settings.iptables.masquerade_all)
    return IptablesProvider(settings=settings, writer=writer, config=config)


def _sysctl(name: str) -> str:
    try:
        return Path(f"/proc/sys/{name}").read_text().strip()
    except OSError:
        return ""
