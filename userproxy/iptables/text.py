"""iptables-restore batches out, iptables-save dumps in. Pure.

Restore batches are written for `--noflush`: declaring a chain (`:NAME - [0:0]`) creates it
or flushes it; chains not declared, including the built-in ones and everyone else's, are
left alone. Each `*table ... COMMIT` block is applied whole or not at all.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from userproxy.iptables.rule import ChainChange, Jump, Ruleset

Owned = Callable[[str], bool]


# ----------------------------------------------------------------------------- batches out
def flush_text(
    ruleset: Ruleset,
    *,
    delete_lines: Mapping[str, Sequence[str]] | None = None,
    add_jumps: Sequence[Jump] = (),
) -> str:
    """A batch that makes every chain of `ruleset` exactly its rules.

    `delete_lines` are per table `-A ...` lines as iptables-save printed them (jumps to
    re-place); they are deleted by their exact spec."""
    out: list[str] = []
    for table, chains in ruleset.chains.items():
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in chains]
        out += ["-D" + line[2:] for line in (delete_lines or {}).get(table, ())]
        for rules in chains.values():
            out += [r.line for r in rules]
        out += _jump_lines(add_jumps, table)
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def change_text(changes: Mapping[str, Mapping[str, ChainChange]], tables: Iterable[str]) -> str:
    """A batch that applies `rule.diff`'s changes (deletes by spec), tables in `tables` order."""
    out: list[str] = []
    for table in tables:
        if table not in changes:
            continue
        out.append(f"*{table}")
        for change in changes[table].values():
            out += ["-D" + r.line[2:] for r in change.removed]
            out += [r.line for r in change.added]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def chains_text(
    desired: Ruleset,
    written: Ruleset | None,
    existing: Mapping[str, set[str]],
    ours: Owned,
    *,
    add_jumps: Sequence[Jump] = (),
) -> str:
    """A batch for chains whose order matters: chains whose content changed since `written`
    (all of them when it is None) are flushed and refilled, unchanged ones are left alone,
    and chains `ours` claims that exist (`existing`) but are no longer wanted are flushed and
    deleted, after every reference to them has been rewritten."""
    out: list[str] = []
    for table, chains in desired.chains.items():
        before = written.chains.get(table, {}) if written is not None else {}
        changed = [c for c, rules in chains.items() if written is None or before.get(c) != rules]
        stale = sorted(c for c in existing.get(table, set()) if c not in chains and ours(c))
        jumps = _jump_lines(add_jumps, table)
        if not (changed or stale or jumps):
            continue
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in (*changed, *stale)]
        for c in changed:
            out += [r.line for r in chains[c]]
        out += jumps
        out += [f"-X {c}" for c in stale]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def _jump_lines(jumps: Sequence[Jump], table: str) -> list[str]:
    out = []
    for jump in jumps:
        if jump.table == table:
            verb = f"-I {jump.chain} 1" if jump.first else f"-A {jump.chain}"
            out.append(jump.rule.line.replace(f"-A {jump.chain}", verb, 1))
    return out


# ----------------------------------------------------------------------------- batches in
@dataclass(frozen=True)
class Op:
    """One command line of a restore batch: `-A`, `-D`, `-I` (at a position) or `-X`."""

    verb: str
    chain: str
    args: tuple[str, ...] = ()
    position: int = 0


@dataclass
class TableBatch:
    table: str
    declared: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)


class BatchError(ValueError):
    pass


def split_args(text: str) -> list[str]:
    """Words of a rule line; quoted ones (comments) unquoted."""
    return shlex.split(text) if '"' in text else text.split()


def parse_batch(text: str) -> list[TableBatch]:
    """A restore batch as per-table declarations and commands, in order."""
    batches: list[TableBatch] = []
    current: TableBatch | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = TableBatch(line[1:])
        elif current is None:
            raise BatchError(f"line {number}: {line!r} is outside a table")
        elif line == "COMMIT":
            batches.append(current)
            current = None
        elif line.startswith(":"):
            current.declared.append(line[1:].split()[0])
        else:
            current.ops.append(_op(line, number))
    if current is not None:
        raise BatchError(f"table {current.table} has no COMMIT")
    return batches


def _op(line: str, number: int) -> Op:
    try:
        words = split_args(line)
    except ValueError as err:
        raise BatchError(f"line {number}: {err}") from None
    if len(words) < 2 or words[0] not in ("-A", "-D", "-I", "-X"):
        raise BatchError(f"line {number}: cannot read {line!r}")
    verb, chain, rest = words[0], words[1], words[2:]
    if verb == "-I" and rest and rest[0].isdigit():
        return Op(verb, chain, tuple(rest[1:]), int(rest[0]))
    return Op(verb, chain, tuple(rest), 1 if verb == "-I" else 0)


# ----------------------------------------------------------------------------- dumps in
def chain_names(dump: str) -> set[str]:
    """The chains a `-save` dump of one table declares."""
    return {line[1:].split()[0] for line in dump.splitlines() if line.startswith(":")}


def jump_target(words: Sequence[str]) -> str | None:
    words = list(words)
    return words[words.index("-j") + 1] if "-j" in words[:-1] else None


def owned_lines(dump: str, ours: Owned) -> list[str]:
    """The lines of a table dump that `ours` claims: its chains, their rules, and jumps into
    them from other chains."""
    out = []
    for line in dump.splitlines():
        words = line.split()
        if not words:
            continue
        if (words[0].startswith(":") and ours(words[0][1:])) or (
            words[0] == "-A" and (ours(words[1]) or ours(jump_target(words) or ""))
        ):
            out.append(line)
    return out


def builtin_chain_lines(
    dumps: Mapping[str, str], jumps: Sequence[Jump]
) -> dict[tuple[str, str], list[str]]:
    """Per (table, built-in chain that holds one of `jumps`), its `-A` lines in order."""
    wanted = {(j.table, j.chain) for j in jumps}
    found: dict[tuple[str, str], list[str]] = {key: [] for key in wanted}
    for table, dump in dumps.items():
        for line in dump.splitlines():
            words = line.split()
            if len(words) > 1 and words[0] == "-A" and (table, words[1]) in wanted:
                found[(table, words[1])].append(line)
    return found


def jump_targets(lines: Iterable[str]) -> list[str]:
    return [jump_target(line.split()) or "" for line in lines]
