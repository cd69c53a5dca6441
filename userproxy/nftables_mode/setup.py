"""Building the nftables mode from the settings: after removing every other mode's rules
(the userspace portals, the iptables mode's chains in either variant)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import structlog

from userproxy.dualstack import DualStack
from userproxy.handover.adoption import Adoption
from userproxy.iptables.interface import RulesError
from userproxy.kernelmodes import check_root, ipv4_first, warn_if_not_forwarding
from userproxy.model import Family
from userproxy.nftables.exec import ExecNftables, nft_available
from userproxy.nftables.interface import NftError
from userproxy.nftables_mode import rules
from userproxy.nftables_mode.provider import NftablesProvider
from userproxy.nftables_mode.rules import NftConfig
from userproxy.provider import StartupError
from userproxy.settings import Settings

log = structlog.get_logger("userproxy")


def make_provider(
    settings: Settings, *, take_over_rules: Callable[[], object], adoption: Adoption | None = None
) -> DualStack:
    """The IPv4 rules in `ip userproxy`, the IPv6 ones in `ip6 userproxy` once an IPv6 or
    dual-stack Service arrives. `adoption` is unused: the kernel serves."""
    check_root("nftables")
    if not nft_available():
        raise StartupError("proxy-mode nftables needs the nft binary: install nftables")
    return ipv4_first(lambda f, take: _family_provider(settings, f, take), take_over_rules)


def _family_provider(
    settings: Settings, family: Family, take_over_rules: Callable[[], object]
) -> NftablesProvider:
    config = NftConfig(
        family=family,
        masquerade_all=settings.iptables.masquerade_all,
        nodeport_cidrs=nodeport_cidrs(settings.nodeport_addresses, family),
    )
    nft = ExecNftables(config.nft_family, rules.TABLE)
    try:
        take_over_rules()  # one instance per node; every other mode's rules go
        nft.exists()  # nft can read this family here
    except (RulesError, NftError) as err:
        raise StartupError(f"cannot program nftables for {family.value} ({err})") from err
    log.info("Running in nftables mode.", table=nft.name, family=family.value)
    warn_if_not_forwarding(family)
    return NftablesProvider(settings=settings, nft=nft, config=config)


def nodeport_cidrs(cidrs: tuple[str, ...], family: Family) -> tuple[str, ...] | None:
    """This family's `--nodeport-addresses` (None: every local address). Loopback is never
    a NodePort address here (as in kube-proxy's nftables mode), so it is left out."""
    if not cidrs:
        return None
    mine = [c for c in cidrs if Family.of(c) is family]
    kept = [c for c in mine if not ipaddress.ip_network(c, strict=False).is_loopback]
    if len(kept) < len(mine):
        log.warning("--nodeport-addresses names loopback; NodePorts on loopback are not served "
                    "in nftables mode.")  # fmt: skip
    return tuple(kept)
