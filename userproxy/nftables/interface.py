"""`Nftables`: what the proxy asks of nftables for one table.

Implementations: `exec.ExecNftables` (the `nft` binary: transactions through `nft -f -`,
reading through `nft --json`) and `userproxy.testing.fakes.FakeNftables` (a model in memory).
"""

from __future__ import annotations

from typing import Protocol

from userproxy.nftables.transaction import NftFamily, Transaction


class NftError(RuntimeError):
    """nft refused a transaction (nothing of it landed), or nftables is not usable here."""


class Nftables(Protocol):
    family: NftFamily
    table: str

    @property
    def name(self) -> str:
        """What writes the rules, for messages (`nft ip userproxy`)."""
        ...

    def run(self, tx: Transaction) -> None:
        """Apply the transaction atomically; raises NftError with nft's reason."""
        ...

    def exists(self) -> bool:
        """Whether the table exists."""
        ...

    def chains(self) -> list[str]:
        """The names of the table's chains ([] when there is no table)."""
        ...

    def sets(self) -> list[str]:
        """The names of the table's sets and maps ([] when there is no table)."""
        ...

    def listing(self) -> str:
        """The table in `nft list` form ("" when there is no table)."""
        ...

    def delete_table(self) -> bool:
        """Delete the table; False when there was none."""
        ...
