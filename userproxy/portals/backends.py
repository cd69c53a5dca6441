"""Writing the portal rules into the kernel: two backends behind one small interface.

- `RestoreBackend`: `iptables-restore --noflush` (legacy or nft). One atomic batch per sync:
  declaring our chains flushes and refills exactly them, so every sync makes them equal to the
  desired set (that is the reconcile, and why a rule deleted by someone else comes back), and
  missing jumps are added in the same batch. 10,000 rules take tens of milliseconds.
- `IptcBackend`: python-iptables (libiptc, legacy x_tables only). One commit per table per
  sync. libiptc takes no lock, so we hold `/run/xtables.lock` (shared with the iptables
  binaries and, in a DaemonSet, the host) around each batch and retry when a concurrent
  writer makes the commit fail with EAGAIN.

`auto` follows the host the way kube-proxy's iptables wrappers decide: kubelet's hint chains
first, then whichever variant already holds more rules, nft when there is nothing to go on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

import structlog

from userproxy.portals.rules import (
    CHAINS,
    JUMPS,
    OWNED_CHAINS,
    ChainChange,
    Jump,
    Rule,
    Ruleset,
    change_text,
    diff,
    plan_jumps,
    restore_text,
)

log = structlog.get_logger("userproxy.iptables")

Variant = Literal["legacy", "nft"]
BackendChoice = Literal["auto", "legacy", "nft"]
XTABLES_LOCK = "/run/xtables.lock"
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


class RulesError(RuntimeError):
    """The kernel refused a batch, or iptables is not usable here."""


class RuleBackend(Protocol):
    name: str

    def apply(self, ruleset: Ruleset, *, full: bool = True) -> None:
        """Make our chains equal `ruleset`. `full=False` may trust that the kernel still holds
        what the previous call wrote and apply only the difference."""
        ...


# ----------------------------------------------------------------------------- save / parse
def save(variant: Variant, table: str) -> str:
    """`iptables-<variant>-save -t table`, or "" when that variant is unusable here."""
    tool = f"iptables-{variant}-save"
    if shutil.which(tool) is None:
        return ""
    result = subprocess.run([tool, "-t", table], capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else ""


def owned_lines(text: str, ours: Callable[[str], bool] = OWNED_CHAINS.__contains__) -> list[str]:
    """The lines of an iptables-save table dump that `ours` claims: its chains, their rules,
    and jumps into them from other chains."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if (words[0].startswith(":") and ours(words[0][1:])) or (
            words[0] == "-A" and (ours(words[1]) or ours(_jump_target(words) or ""))
        ):
            out.append(line)
    return out


def _jump_target(words: list[str]) -> str | None:
    return words[words.index("-j") + 1] if "-j" in words[:-1] else None


def builtin_chain_lines(
    texts: dict[str, str], jumps: Sequence[Jump] = JUMPS
) -> dict[tuple[str, str], list[str]]:
    """Per (table, built-in chain that holds one of our jumps), its `-A` lines in order."""
    wanted = {(j.table, j.chain) for j in jumps}
    found: dict[tuple[str, str], list[str]] = {key: [] for key in wanted}
    for table, text in texts.items():
        for line in text.splitlines():
            words = line.split()
            if len(words) > 1 and words[0] == "-A" and (table, words[1]) in wanted:
                found[(table, words[1])].append(line)
    return found


def jump_targets(lines: list[str]) -> list[str]:
    return [_jump_target(line.split()) or "" for line in lines]


def rule_count(variant: Variant) -> int:
    return sum(
        line.startswith("-A ")
        for table in ("filter", "nat", "mangle")
        for line in save(variant, table).splitlines()
    )


def detect_variant() -> Variant:
    for variant in ("nft", "legacy"):
        mangle = save(variant, "mangle")
        if any(f":{hint} " in mangle for hint in HINT_CHAINS):
            return variant
    return "legacy" if rule_count("legacy") > rule_count("nft") else "nft"


# ----------------------------------------------------------------------------- restore backend
class RestoreBackend:
    """Full syncs flush and refill our chains; in between, only the rules that changed are
    deleted and appended (a 10,000-port node pays for one change, not for 30,000 rules).
    Anything else changed by others is repaired at the next full sync."""

    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self.name = f"iptables-{variant}-restore"
        if shutil.which(self.name) is None:
            raise RulesError(f"{self.name} is not installed (install the iptables package)")
        self._written: Ruleset | None = None

    def apply(self, ruleset: Ruleset, *, full: bool = True) -> None:
        written, self._written = self._written, None  # unknown until this batch lands
        if full or written is None:
            self._restore(self._full_text(ruleset), verify=_has_new_rules(ruleset, written))
        else:
            changes = diff(written, ruleset)
            text = change_text(changes)
            if text:
                try:
                    self._restore(
                        text, verify=any(c.added for t in changes.values() for c in t.values())
                    )
                except RulesError as err:  # e.g. a rule we delete was deleted by someone else
                    log.info(
                        "Rewriting every portal chain after a partial update failed.",
                        reason=str(err),
                    )
                    self._restore(self._full_text(ruleset), verify=True)
        self._written = ruleset

    def _full_text(self, ruleset: Ruleset) -> str:
        current = builtin_chain_lines({table: self._list_builtins(table) for table in CHAINS})
        plan = plan_jumps({key: jump_targets(lines) for key, lines in current.items()})
        delete: dict[str, list[str]] = {}
        for jump in plan.remove:
            lines = current[(jump.table, jump.chain)]
            doomed = [ln for ln in lines if _jump_target(ln.split()) == jump.rule.target.name]
            delete.setdefault(jump.table, []).extend(doomed)
        return restore_text(ruleset, delete_lines=delete, add_jumps=plan.add)

    def _list_builtins(self, table: str) -> str:
        """`-S` of the built-in chains holding our jumps: with nft this reads only those
        chains (a full save of a 30,000-rule table takes ~0.4 s)."""
        out = []
        for chain in sorted({j.chain for j in JUMPS if j.table == table}):
            result = subprocess.run(
                [f"iptables-{self.variant}", "-w", "5", "-t", table, "-S", chain],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RulesError(
                    f"iptables-{self.variant} cannot list {table}/{chain}: {result.stderr.strip()}"
                )
            out.append(result.stdout)
        return "\n".join(out)

    def _restore(self, text: str, *, verify: bool) -> None:
        # iptables-restore commits table by table: a rule it refuses in nat would land after
        # filter was already changed. So a batch that spans both tables and holds rules never
        # written before is first parsed and built with --test, which commits nothing: a
        # batch the tool refuses changes nothing. (~0.2 s for 20,000 new rules; re-syncs of
        # known rules skip it.)
        passes = (["--test"], []) if verify and text.count("COMMIT") > 1 else ([],)
        for extra in passes:
            result = subprocess.run(
                [self.name, "--noflush", "-w", "5", *extra],
                input=text,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RulesError(f"{self.name} refused the batch: {_explain(result.stderr, text)}")


def _has_new_rules(ruleset: Ruleset, written: Ruleset | None) -> bool:
    if written is None:
        return True
    known = {
        rule for chains in written.chains.values() for rules in chains.values() for rule in rules
    }
    return any(
        rule not in known
        for chains in ruleset.chains.values()
        for rules in chains.values()
        for rule in rules
    )


def _explain(stderr: str, batch: str) -> str:
    """The tool's first error line, plus the batch line it points at."""
    first = stderr.strip().splitlines()[0] if stderr.strip() else "no error message"
    match = re.search(r"Error occurred at line: (\d+)", stderr)
    lines = batch.splitlines()
    if match and 0 < int(match.group(1)) <= len(lines):
        return f"{first} (in: {lines[int(match.group(1)) - 1]})"
    return first


# ----------------------------------------------------------------------------- python-iptables
@contextlib.contextmanager
def xtables_lock(path: str = XTABLES_LOCK, timeout: float = 5.0) -> Iterator[None]:
    """Hold the lock every iptables binary takes (flock on /run/xtables.lock)."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RulesError(f"another process held {path} for {timeout:.0f}s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


class IptcBackend:
    name = "python-iptables (legacy)"
    ATTEMPTS = 5
    MAX_ENTRIES = 1 << 18

    def __init__(self) -> None:
        try:
            import iptc
        except Exception as err:  # pragma: no cover - depends on the host's libiptc
            raise RulesError(f"python-iptables cannot load libiptc: {err}") from err
        self._iptc = iptc
        self._written: Ruleset | None = None
        self._entries: dict[Rule, Any] = {}

    def apply(self, ruleset: Ruleset, *, full: bool = True) -> None:
        written, self._written = self._written, None  # unknown until this batch lands
        for chains in ruleset.chains.values():  # parse every rule before the first commit,
            for rules in chains.values():  # so a rule libxtables refuses changes nothing
                for rule in rules:
                    self._entry(rule)
        if not full and written is not None:
            changes = diff(written, ruleset)
            try:
                self._commit(lambda table, name: self._change_table(table, name, changes), changes)
                self._written = ruleset
                return
            except RulesError as err:  # e.g. a rule we delete was deleted by someone else
                log.info(
                    "Rewriting every portal chain after a partial update failed.", reason=str(err)
                )
        self._commit(lambda table, name: self._fill_table(table, name, ruleset), ruleset.chains)
        self._written = ruleset

    def _commit(self, edit: Callable[[Any, str], None], tables: Iterable[str]) -> None:
        """Run `edit` on each table's handle and commit, filter first (see CHAINS), holding the
        xtables lock; retried when another writer committed first (EAGAIN)."""
        names = [t for t in CHAINS if t in tables]
        for attempt in range(self.ATTEMPTS):
            try:
                with xtables_lock():
                    for name in names:
                        table = self._iptc.Table(name, autocommit=False)
                        # The handle goes stale after every commit; refresh() also opens it in
                        # this thread's network namespace.
                        table.refresh()
                        edit(table, name)
                        table.commit()
                        table.refresh()
                return
            except self._iptc.IPTCError as err:
                if "temporarily unavailable" not in str(err) or attempt == self.ATTEMPTS - 1:
                    raise RulesError(f"python-iptables could not commit: {err}") from err
                time.sleep(0.05 * 2**attempt)

    def _fill_table(self, table: Any, table_name: str, ruleset: Ruleset) -> None:
        iptc = self._iptc
        for name, rules in ruleset.chains[table_name].items():
            chain = iptc.Chain(table, name) if table.is_chain(name) else table.create_chain(name)
            chain.flush()
            for rule in rules:
                chain.append_rule(self._entry(rule))
        self._fix_jumps(table, table_name)

    def _change_table(
        self, table: Any, table_name: str, changes: dict[str, dict[str, ChainChange]]
    ) -> None:
        for name, change in changes.get(table_name, {}).items():
            chain = self._iptc.Chain(table, name)
            for rule in change.removed:
                chain.delete_rule(self._entry(rule))
            for rule in change.added:
                chain.append_rule(self._entry(rule))

    def _entry(self, rule: Rule) -> Any:
        """python-iptables' object for a rule, built once: building costs ~0.15 ms a rule."""
        entry = self._entries.get(rule)
        if entry is None:
            try:
                entry = self._entries[rule] = self._rule(rule)
            except Exception as err:
                raise RulesError(f"python-iptables refused the rule {rule.line!r}: {err}") from err
            if len(self._entries) > self.MAX_ENTRIES:
                self._entries = {rule: entry}  # bounded: forget rules of ports long gone
        return entry

    def _fix_jumps(self, table: object, table_name: str) -> None:
        iptc = self._iptc
        builtins = {j.chain: iptc.Chain(table, j.chain) for j in JUMPS if j.table == table_name}
        plan = plan_jumps(
            {(table_name, name): [r.target.name for r in c.rules] for name, c in builtins.items()}
        )
        for jump in plan.remove:
            if jump.table == table_name:
                chain = builtins[jump.chain]
                for rule in [r for r in chain.rules if r.target.name == jump.rule.target.name]:
                    chain.delete_rule(rule)
        for jump in plan.add:
            if jump.table == table_name:
                rule = self._rule(jump.rule)
                if jump.first:
                    builtins[jump.chain].insert_rule(rule)
                else:
                    builtins[jump.chain].append_rule(rule)

    def _rule(self, spec: Rule) -> object:
        r = self._iptc.Rule()
        # Matches are created in Rule.args() order, so iptables-save prints the same text
        # whichever backend wrote the rule.
        if spec.comment is not None:
            r.create_match("comment").comment = spec.comment
        if spec.protocol is not None:
            r.protocol = spec.protocol
            if spec.dport is not None:
                r.create_match(spec.protocol).dport = str(spec.dport)
        if spec.dports is not None:
            r.create_match("multiport").dports = spec.dports
        if spec.dst is not None:
            r.dst = spec.dst
        if spec.not_dst is not None:
            r.dst = f"!{spec.not_dst}"
        if spec.not_in_interface is not None:
            r.in_interface = f"!{spec.not_in_interface}"
        if spec.physdev_not_in:
            r.create_match("physdev").physdev_is_in = "!"
        if spec.addrtype_local:
            r.create_match("addrtype").dst_type = "LOCAL"
        if spec.ctstate_not_dnat:
            r.create_match("conntrack").ctstate = "!DNAT"
        if spec.state_new:
            r.create_match("state").state = "NEW"
        target = r.create_target(spec.target.name)
        for attr in ("to_ports", "to_destination", "reject_with"):
            value = getattr(spec.target, attr)
            if value is not None:
                setattr(target, attr, str(value))
        return r


# ----------------------------------------------------------------------------- selection, cleanup
def make_backend(choice: BackendChoice) -> RuleBackend:
    variant: Variant = detect_variant() if choice == "auto" else choice
    backend: RuleBackend = IptcBackend() if variant == "legacy" else RestoreBackend("nft")
    log.info("Programming portal rules.", backend=backend.name, requested=choice)
    return backend


def cleanup_variant(variant: Variant) -> int:
    """Remove every userproxy chain and jump from one variant. Returns how many lines went."""
    return remove_chains(variant, {table: save(variant, table) for table in CHAINS})


def remove_chains(
    variant: Variant,
    texts: dict[str, str],
    ours: Callable[[str], bool] = OWNED_CHAINS.__contains__,
) -> int:
    """Delete the jumps into, flush and remove the chains `ours` claims in these table dumps,
    in one batch. Returns how many chains and jumps went."""
    tool = f"iptables-{variant}-restore"
    if shutil.which(tool) is None:
        return 0
    removed, batch = 0, []
    for table, text in texts.items():
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
        result = subprocess.run(
            [tool, "--noflush", "-w", "5"],
            input="\n".join(batch) + "\n",
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RulesError(f"{tool} could not remove the rules: {result.stderr.strip()}")
    return removed


def cleanup() -> int:
    """Remove userproxy's chains and jumps from both legacy and nft. Idempotent."""
    return sum(cleanup_variant(v) for v in ("legacy", "nft"))


def owned_rules_text() -> str:
    """What userproxy owns in the kernel, in iptables-save form, per variant that has any."""
    return "".join(
        owned_text(variant, {table: save(variant, table) for table in CHAINS})
        for variant in ("legacy", "nft")
    )


def owned_text(
    variant: Variant,
    texts: dict[str, str],
    ours: Callable[[str], bool] = OWNED_CHAINS.__contains__,
    heading: str = "",
) -> str:
    out = []
    for table, text in texts.items():
        lines = owned_lines(text, ours)
        if lines:
            out += [f"# iptables-{variant}{heading}", f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + ("\n" if out else "")
