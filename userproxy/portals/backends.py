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
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Literal, Protocol

import structlog

from userproxy.portals.rules import CHAINS, JUMPS, OWNED_CHAINS, Jump, Rule, Ruleset, restore_text

log = structlog.get_logger("userproxy.iptables")

Variant = Literal["legacy", "nft"]
BackendChoice = Literal["auto", "legacy", "nft"]
XTABLES_LOCK = "/run/xtables.lock"
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


class RulesError(RuntimeError):
    """The kernel refused a batch, or iptables is not usable here."""


class RuleBackend(Protocol):
    name: str

    def apply(self, ruleset: Ruleset) -> None: ...


# ----------------------------------------------------------------------------- save / parse
def save(variant: Variant, table: str) -> str:
    """`iptables-<variant>-save -t table`, or "" when that variant is unusable here."""
    tool = f"iptables-{variant}-save"
    if shutil.which(tool) is None:
        return ""
    result = subprocess.run([tool, "-t", table], capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else ""


def owned_lines(text: str) -> list[str]:
    """The lines of an iptables-save table dump that userproxy owns: chains, rules, jumps."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if (words[0].startswith(":") and words[0][1:] in OWNED_CHAINS) or (
            words[0] == "-A" and (words[1] in OWNED_CHAINS or _jump_target(words) in OWNED_CHAINS)
        ):
            out.append(line)
    return out


def _jump_target(words: list[str]) -> str | None:
    return words[words.index("-j") + 1] if "-j" in words[:-1] else None


def has_jump(text: str, jump: Jump) -> bool:
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["-A", jump.chain] and _jump_target(words) == jump.rule.target.name:
            return True
    return False


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
    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self.name = f"iptables-{variant}-restore"
        if shutil.which(self.name) is None:
            raise RulesError(f"{self.name} is not installed (install the iptables package)")

    def apply(self, ruleset: Ruleset) -> None:
        current = {table: save(self.variant, table) for table in CHAINS}
        missing = [j for j in JUMPS if not has_jump(current[j.table], j)]
        self._restore(restore_text(ruleset, missing_jumps=missing))

    def _restore(self, text: str) -> None:
        result = subprocess.run(
            [self.name, "--noflush", "-w", "5"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RulesError(f"{self.name} refused the batch: {result.stderr.strip()}")


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

    def __init__(self) -> None:
        try:
            import iptc
        except Exception as err:  # pragma: no cover - depends on the host's libiptc
            raise RulesError(f"python-iptables cannot load libiptc: {err}") from err
        self._iptc = iptc

    def apply(self, ruleset: Ruleset) -> None:
        for attempt in range(self.ATTEMPTS):
            try:
                with xtables_lock():
                    for table, chains in ruleset.chains.items():
                        self._apply_table(table, chains)
                return
            except self._iptc.IPTCError as err:
                if "temporarily unavailable" not in str(err) or attempt == self.ATTEMPTS - 1:
                    raise RulesError(f"python-iptables could not commit: {err}") from err
                time.sleep(0.05 * 2**attempt)  # another writer committed meanwhile

    def _apply_table(self, table_name: str, chains: dict[str, list[Rule]]) -> None:
        iptc = self._iptc
        table = iptc.Table(table_name, autocommit=False)
        table.refresh()  # the handle is per-process and goes stale after every commit
        for name, rules in chains.items():
            chain = iptc.Chain(table, name) if table.is_chain(name) else table.create_chain(name)
            chain.flush()
            for rule in rules:
                chain.append_rule(self._rule(rule))
        for jump in JUMPS:
            if jump.table == table_name:
                self._ensure_jump(table, jump)
        table.commit()
        table.refresh()

    def _ensure_jump(self, table: object, jump: Jump) -> None:
        iptc = self._iptc
        chain = iptc.Chain(table, jump.chain)
        if any(r.target.name == jump.rule.target.name for r in chain.rules):
            return
        rule = self._rule(jump.rule)
        if jump.first:
            chain.insert_rule(rule)
        else:
            chain.append_rule(rule)

    def _rule(self, spec: Rule) -> object:
        r = self._iptc.Rule()
        if spec.protocol is not None:
            r.protocol = spec.protocol
            match = r.create_match(spec.protocol)
            if spec.dport is not None:
                match.dport = str(spec.dport)
        if spec.dst is not None:
            r.dst = spec.dst
        if spec.not_dst is not None:
            r.dst = f"!{spec.not_dst}"
        if spec.not_in_interface is not None:
            r.in_interface = f"!{spec.not_in_interface}"
        if spec.comment is not None:
            r.create_match("comment").comment = spec.comment
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
    tool = f"iptables-{variant}-restore"
    if shutil.which(tool) is None:
        return 0
    removed, batch = 0, []
    for table in CHAINS:
        lines = owned_lines(save(variant, table))
        jumps = [ln for ln in lines if ln.startswith("-A ") and ln.split()[1] not in OWNED_CHAINS]
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
    out = []
    for variant in ("legacy", "nft"):
        for table in CHAINS:
            lines = owned_lines(save(variant, table))
            if lines:
                out += [f"# iptables-{variant}", f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + ("\n" if out else "")
