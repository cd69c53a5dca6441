"""Building the iptables mode from the settings: on the host's iptables variant, after
removing the userspace mode's portals and any iptables-mode rules in the other variant."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from userproxy.dualstack import DualStack
from userproxy.handover.adoption import Adoption
from userproxy.iptables.detect import choose_variant, host_iptables
from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.interface import RulesError
from userproxy.iptables_mode import provider as iptables_mode
from userproxy.iptables_mode.provider import IptablesProvider, KernelRuleWriter
from userproxy.iptables_mode.rules import KernelConfig
from userproxy.kernelmodes import check_root, ipv4_first, warn_if_not_forwarding
from userproxy.model import Family
from userproxy.provider import StartupError
from userproxy.settings import Settings

log = structlog.get_logger("userproxy")


def make_provider(
    settings: Settings, *, take_over_rules: Callable[[], object], adoption: Adoption | None = None
) -> DualStack:
    """The IPv4 rules in iptables, and the IPv6 ones in ip6tables once an IPv6 or dual-stack
    Service arrives. `adoption` is unused: the kernel serves, there are no listening sockets
    to inherit."""
    check_root("iptables")
    return ipv4_first(lambda f, take: _family_provider(settings, f, take), take_over_rules)


def _family_provider(
    settings: Settings, family: Family, take_over_rules: Callable[[], object]
) -> IptablesProvider:
    try:
        variant = choose_variant(settings.iptables.backend)
        writer = KernelRuleWriter(ExecIptables(variant, family))
        take_over_rules()  # one instance per node; the userspace mode's portals go
        for other, host in host_iptables(family).items():
            if other != variant:
                iptables_mode.cleanup(host)
    except RulesError as err:
        raise StartupError(f"cannot program {family.tool} ({err})") from err
    log.info("Running in iptables mode.", backend=writer.iptables.name, family=family.value)
    warn_if_not_forwarding(family)
    config = KernelConfig(masquerade_all=settings.iptables.masquerade_all, family=family)
    return IptablesProvider(settings=settings, writer=writer, config=config)
