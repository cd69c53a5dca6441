"""`Iptables` on the iptables binaries: `iptables-<variant>-save`, `-restore --noflush`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from userproxy.iptables.interface import RulesError, Variant
from userproxy.model import Family

#: Seconds to wait for the xtables lock (`-w`).
LOCK_WAIT = "5"


class ExecIptables:
    def __init__(self, variant: Variant, family: Family = Family.IPv4) -> None:
        self.variant = variant
        self.family = family
        self._tool = f"{'ip6tables' if family is Family.IPv6 else 'iptables'}-{variant}"

    @property
    def name(self) -> str:
        return f"{self._tool}-restore"

    def available(self) -> bool:
        return shutil.which(self.name) is not None

    def _holds(self, table: str) -> bool:
        """Whether the table exists in this variant. Reading a legacy table that does not
        exist yet creates it (the kernel loads it on first use), and from then on every
        iptables-save on the node warns "iptables-legacy tables present": legacy tables are
        only read once /proc says they exist."""
        if self.variant != "legacy":
            return True
        names = "ip6_tables_names" if self.family is Family.IPv6 else "ip_tables_names"
        try:
            return table in Path("/proc/net", names).read_text().split()
        except OSError:  # no legacy x_tables in this kernel or namespace at all
            return False

    def save(self, table: str, *, counters: bool = False) -> str:
        tool = f"{self._tool}-save"
        if shutil.which(tool) is None or not self._holds(table):
            return ""
        args = [tool, *(["-c"] if counters else []), "-t", table]
        result = subprocess.run(args, capture_output=True, text=True, check=False)
        return result.stdout if result.returncode == 0 else ""

    def list_rules(self, table: str, chain: str) -> str:
        if not self._holds(table):
            return ""  # the table, hence the chain, holds nothing yet
        args = [self._tool, "-w", LOCK_WAIT, "-t", table, "-S", chain]
        result = subprocess.run(args, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RulesError(f"{self._tool} cannot list {table}/{chain}: {result.stderr.strip()}")
        return result.stdout

    def restore(self, text: str, *, test_first: bool = False) -> None:
        if not self.available():
            raise RulesError(f"{self.name} is not installed (install the iptables package)")
        # iptables-restore commits table by table: a rule it refuses in nat would land after
        # filter was already changed. --test parses and builds every table, committing none.
        passes = (["--test"], []) if test_first and text.count("COMMIT") > 1 else ([],)
        for extra in passes:
            result = subprocess.run(
                [self.name, "--noflush", "-w", LOCK_WAIT, *extra],
                input=text,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RulesError(f"{self.name} refused the batch: {explain(result.stderr, text)}")


def explain(stderr: str, batch: str) -> str:
    """The tool's first error line, plus the batch line it points at."""
    first = stderr.strip().splitlines()[0] if stderr.strip() else "no error message"
    match = re.search(r"Error occurred at line: (\d+)", stderr)
    lines = batch.splitlines()
    if match and 0 < int(match.group(1)) <= len(lines):
        return f"{first} (in: {lines[int(match.group(1)) - 1]})"
    return first
