"""`Nftables` on the `nft` binary: transactions through `nft -f -`, reading through
`nft --terse --json`.

Not libnftables in-process: its netlink code puts the socket in an `fd_set`, and glibc aborts
the whole process when that descriptor is above 1,023, which it is as soon as a node serves
a thousand service ports (seen: "bit out of range 0 - FD_SETSIZE on fd_set"). A process per
call costs little beside nft's own work: one change among 10,000 services is ~100 ms either
way, most of it nft reading the table's chains back before it applies anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from userproxy.nftables.interface import NftError
from userproxy.nftables.transaction import NftFamily, Table, Transaction

#: No nft call may hold up a sync (or the exit) for longer than this.
NFT_TIMEOUT = 30.0


def nft_available() -> bool:
    return shutil.which("nft") is not None


class ExecNftables:
    def __init__(self, family: NftFamily, table: str) -> None:
        self.family = family
        self.table = table

    @property
    def name(self) -> str:
        return f"nft {self.family.value} {self.table}"

    def _nft(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        if not nft_available():
            raise NftError("nft is not installed (install the nftables package)")
        try:
            return subprocess.run(
                ["nft", *args],
                input=stdin,
                capture_output=True,
                text=True,
                check=False,
                timeout=NFT_TIMEOUT,
            )
        except subprocess.TimeoutExpired as err:
            raise NftError(f"nft {' '.join(args)} did not finish in {NFT_TIMEOUT:.0f} s") from err

    def run(self, tx: Transaction) -> None:
        if not tx:
            return
        result = self._nft("-f", "-", stdin=tx.text())
        if result.returncode != 0:
            raise NftError(f"nft refused the transaction: {explain(result.stderr)}")

    def _list(self, what: str) -> list[dict[str, Any]]:
        # Terse: no set elements. Listing sets or tables without it reads every element of
        # every set (0.3 s for a 30,000-element table); terse, or chains, take 3 ms.
        result = self._nft("--terse", "--json", "list", what, self.family.value)
        if result.returncode != 0:
            raise NftError(f"nft cannot list {what}: {explain(result.stderr)}")
        try:
            items = json.loads(result.stdout or "{}").get("nftables", [])
        except json.JSONDecodeError as err:
            raise NftError(f"nft --json list {what} gave no JSON ({err})") from err
        return [i for i in items if isinstance(i, dict)]

    def _names(self, what: str, kind: str) -> list[str]:
        out = []
        for item in self._list(what):
            obj = item.get(kind)
            if isinstance(obj, dict) and obj.get("table") == self.table:
                out.append(str(obj["name"]))
        return out

    def exists(self) -> bool:
        """Whether the table is there, read from the chains (our tables always have their
        base chains; `list tables` would read every set element first)."""
        return bool(self.chains())

    def chains(self) -> list[str]:
        return self._names("chains", "chain")

    def sets(self) -> list[str]:
        return self._names("sets", "set") + self._names("maps", "map")

    def listing(self) -> str:
        if not self.exists():
            return ""
        result = self._nft("list", "table", self.family.value, self.table)
        if result.returncode != 0:
            raise NftError(f"nft cannot list table {self.table}: {explain(result.stderr)}")
        return result.stdout

    def delete_table(self) -> bool:
        if not nft_available() or not self.exists():
            return False
        tx = Transaction(self.family, self.table)
        tx.delete(Table())
        self.run(tx)
        return True


def explain(stderr: str) -> str:
    """nft's first error, with the command it points at (nft prints it on the next line)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return "no error message"
    first = lines[0]
    if len(lines) > 1 and not lines[1].lstrip().startswith("^"):
        return f"{first} (in: {lines[1].strip()[:200]})"
    return first
