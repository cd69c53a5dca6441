"""How long one portal sync takes for many service ports, per rule backend.

    sudo python3 bench/rules.py [--ports 1000,10000] [--repeat 3]

Runs itself in a private network namespace (`unshare --net`), so the host's tables are never
touched and nothing is left behind. For each size and backend it times, median of --repeat:
  first   - an empty kernel to the full rule set (a node starting up)
  resync  - the same rule set again, written whole (the periodic full sync)
  change  - one service port moved to a new ClusterIP (a sync after an API change, which
            writes only the difference)
Service ports are shaped like a big cluster's: every one has a ClusterIP (2 nat rules), one in
ten also a NodePort (+3 rules) and one in twenty no endpoints (+1 REJECT); the proxy-port guard
adds one multiport rule per 15 proxy ports. The time includes building the rules in Python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from userproxy import main as composition
from userproxy.iptables.chains import ChainSync
from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.iptc import IptcIptables
from userproxy.model import ServicePort, ServicePortName
from userproxy.userspace.portals import backends
from userproxy.userspace.portals.rules import PortalConfig, PortalPort, RuleBuilder, Ruleset

CONFIG = PortalConfig(bind_address="0.0.0.0", host_ip="192.168.50.1")
BACKENDS: dict[str, Callable[[], ChainSync]] = {
    "iptables-nft-restore": lambda: backends.portal_sync(ExecIptables("nft")),
    "iptables-legacy-restore": lambda: backends.portal_sync(ExecIptables("legacy")),
    "python-iptables": lambda: backends.portal_sync(IptcIptables()),
}


def ports(count: int, moved: int | None = None) -> list[PortalPort]:
    out = []
    for i in range(count):
        second = 96 if i != moved else 200  # the moved port gets a new ClusterIP
        port = ServicePort(
            ServicePortName(f"ns{i // 100}", f"svc{i}", "http"),
            f"10.{second}.{i // 250}.{i % 250 + 1}",
            80,
            node_port=30000 + i // 10 if i % 10 == 0 else 0,
        )
        out.append(PortalPort(port, 20000 + i, has_endpoints=i % 20 != 7, node_port_claimed=True))
    return out


def timed(
    backend: ChainSync, builder: RuleBuilder, entries: list[PortalPort], *, full: bool
) -> tuple[float, Ruleset]:
    started = time.perf_counter()
    rules = builder.build(entries)
    backend.apply(rules, full=full)
    return time.perf_counter() - started, rules


def measure(count: int, name: str, repeat: int) -> dict[str, float]:
    full, changed = ports(count), ports(count, moved=count // 2)
    results: dict[str, list[float]] = {"first": [], "resync": [], "change": []}
    size = 0
    for _ in range(repeat):
        composition.remove_rules()
        backend, builder = BACKENDS[name](), RuleBuilder(CONFIG)
        took, rules = timed(backend, builder, full, full=True)
        results["first"].append(took)
        results["resync"].append(timed(backend, builder, full, full=True)[0])
        results["change"].append(timed(backend, builder, changed, full=False)[0])
        size = len(rules)
    composition.remove_rules()
    return {k: statistics.median(v) for k, v in results.items()} | {"rules": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside:
        if os.geteuid() != 0:
            sys.exit("bench/rules.py needs root (it makes a private network namespace)")
        argv = ["unshare", "--net", sys.executable, __file__, *sys.argv[1:], "--inside"]
        sys.exit(subprocess.run(argv, check=False).returncode)
    print("| service ports | rules | backend | first sync | full re-sync | one change |")
    print("|---:|---:|---|---:|---:|---:|")
    for count in (int(c) for c in args.ports.split(",")):
        for name in args.backends.split(","):
            r = measure(count, name, args.repeat)
            print(
                f"| {count:,} | {int(r['rules']):,} | {name} | {r['first'] * 1000:.0f} ms"
                f" | {r['resync'] * 1000:.0f} ms | {r['change'] * 1000:.0f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    main()
