"""Whether the host uses nftables natively: the portals' `auto` backend follows the host, as
the iptables variant does (rules of two systems at one hook cannot be ordered)."""

from __future__ import annotations

import json
import subprocess

from userproxy.nftables.exec import NFT_TIMEOUT, nft_available

#: Tables iptables-nft creates: their presence says "iptables", not "nftables".
IPTABLES_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})


def native_tables(listing: dict[str, object]) -> list[tuple[str, str]]:
    """(family, name) of the tables in an `nft --json list tables` document that iptables-nft
    did not create."""
    items = listing.get("nftables")
    out = []
    for item in items if isinstance(items, list) else []:
        table = item.get("table") if isinstance(item, dict) else None
        if not isinstance(table, dict):
            continue
        family, name = str(table.get("family")), str(table.get("name"))
        if family in ("ip", "ip6") and name in IPTABLES_TABLES:
            continue
        out.append((family, name))
    return out


def nft_tables() -> list[tuple[str, str]]:
    """The host's native nftables tables ([] without nft, or when it cannot list)."""
    if not nft_available():
        return []
    try:
        result = subprocess.run(
            ["nft", "--json", "list", "tables"],
            capture_output=True,
            text=True,
            check=False,
            timeout=NFT_TIMEOUT,
        )
        return native_tables(json.loads(result.stdout or "{}")) if result.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return []
