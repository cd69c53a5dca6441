"""Removing, and showing, the chains a proxy mode owns: one routine for every mode."""

from __future__ import annotations

from collections.abc import Iterable

from userproxy.iptables.interface import Iptables
from userproxy.iptables.text import Owned, owned_lines


def dumps(iptables: Iptables, tables: Iterable[str]) -> dict[str, str]:
    return {table: iptables.save(table) for table in tables}


def remove_owned(iptables: Iptables, dumps: dict[str, str], ours: Owned) -> int:
    """Delete the jumps into, flush and remove the chains `ours` claims in these table dumps,
    in one batch. Returns how many chains and jumps went."""
    if not iptables.available():
        return 0
    removed, batch = 0, []
    for table, text in dumps.items():
        lines = owned_lines(text, ours)
        jumps = [ln for ln in lines if ln.startswith("-A ") and not ours(ln.split()[1])]
        present = [ln.split()[0][1:] for ln in lines if ln.startswith(":")]
        if not jumps and not present:
            continue
        removed += len(jumps) + len(present)
        batch.append(f"*{table}")
        batch += ["-D" + ln[2:] for ln in jumps]
        batch += [f":{chain} - [0:0]" for chain in present]  # flush, so the chain can go
        batch += [f"-X {chain}" for chain in present]
        batch.append("COMMIT")
    if batch:
        iptables.restore("\n".join(batch) + "\n")
    return removed


def owned_text(iptables: Iptables, dumps: dict[str, str], ours: Owned, heading: str = "") -> str:
    """What `ours` claims in these dumps, in iptables-save form, under a `# <tool>` heading."""
    out = []
    for table, text in dumps.items():
        lines = owned_lines(text, ours)
        if lines:
            tool = iptables.name.removesuffix("-restore")
            out += [f"# {tool}{heading}", f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + ("\n" if out else "")
