"""`Iptables`: what the proxy asks of one iptables variant (legacy or nft) for one family.

Implementations: `exec.ExecIptables` (the binaries), `iptc.IptcIptables` (python-iptables,
legacy only) and `userproxy.testing.fakes.FakeIptables` (parses what it is given).
"""

from __future__ import annotations

from typing import Literal, Protocol

from userproxy.model import Family

Variant = Literal["legacy", "nft"]
VARIANTS: tuple[Variant, ...] = ("legacy", "nft")


class RulesError(RuntimeError):
    """The kernel refused a batch, or iptables is not usable here."""


class Iptables(Protocol):
    variant: Variant
    family: Family

    @property
    def name(self) -> str:
        """What writes the rules, for messages (`iptables-nft-restore`, ...)."""
        ...

    def available(self) -> bool:
        """Whether this variant can be used on this host at all."""
        ...

    def save(self, table: str, *, counters: bool = False) -> str:
        """The table in iptables-save form, or "" when the variant is unusable here."""
        ...

    def list_rules(self, table: str, chain: str) -> str:
        """`-S` of one chain (with nft this reads only that chain, not the whole table)."""
        ...

    def restore(self, text: str, *, test_first: bool = False) -> None:
        """Apply a `--noflush` batch; each table commits whole or not at all. `test_first`
        checks every table before committing any (a batch refused anywhere changes nothing).
        Raises RulesError with the tool's reason."""
        ...
