"""How long one rule sync takes for many service ports, per rule backend.

    sudo python3 bench/rules.py [--ports 1000,10000] [--repeat 3]

Backends: the userspace portals on iptables-nft-restore, iptables-legacy-restore,
python-iptables and nftables (`--portals-backend nftables`), and `--proxy-mode nftables`
(the whole kernel data plane: per-service chains, an endpoint each, map elements).

Runs itself in a private network namespace (`unshare --net`), so the host's tables are never
touched and nothing is left behind. For each size and backend it times, median of --repeat:
  first   - an empty kernel to the full rule set (a node starting up)
  resync  - the same rule set again, written whole (the periodic full sync)
  change  - one service port moved to a new ClusterIP (a sync after an API change, which
            writes only the difference)
Service ports are shaped like a big cluster's: every one has a ClusterIP (2 nat rules), one in
ten also a NodePort (+3 rules) and one in twenty no endpoints (+1 REJECT); the proxy-port guard
adds one multiport rule per 15 proxy ports. The time includes building the rules in Python.
For the nftables mode, one change is an endpoint added to one service (its chains rewritten,
its elements untouched).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import operator
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from userproxy import main as composition
from userproxy.convert import EndpointsResult
from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.iptc import IptcIptables
from userproxy.model import Endpoint, EndpointInfo, ServicePort, ServicePortName
from userproxy.nftables.exec import ExecNftables
from userproxy.nftables.transaction import NftFamily
from userproxy.nftables_mode import rules as nft_mode
from userproxy.nftables_mode.provider import NftablesProvider
from userproxy.settings import Settings
from userproxy.userspace.portals import backends, nftrules
from userproxy.userspace.portals.interface import PortalRules
from userproxy.userspace.portals.nftwriter import NftPortals
from userproxy.userspace.portals.rules import PortalConfig, PortalPort

CONFIG = PortalConfig(bind_address="0.0.0.0", host_ip="192.168.50.1")
PORTALS: dict[str, Callable[[], PortalRules]] = {
    "iptables-nft-restore": lambda: backends.IptablesPortals(ExecIptables("nft"), CONFIG),
    "iptables-legacy-restore": lambda: backends.IptablesPortals(ExecIptables("legacy"), CONFIG),
    "python-iptables": lambda: backends.IptablesPortals(IptcIptables(), CONFIG),
    "nftables portals": lambda: NftPortals(
        ExecNftables(NftFamily.IP, nftrules.TABLE), nftrules.ElementBuilder(CONFIG)
    ),
}
NFTABLES_MODE = "nftables mode"
BACKENDS = [*PORTALS, NFTABLES_MODE]


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


def timed(backend: PortalRules, entries: list[PortalPort], *, full: bool) -> tuple[float, int]:
    started = time.perf_counter()
    desired = backend.build(entries)
    backend.apply(desired, full=full)
    size = sum(len(c) for c in desired.values()) if isinstance(desired, dict) else len(desired)
    return time.perf_counter() - started, size


def measure(count: int, name: str, repeat: int) -> dict[str, float]:
    if name == NFTABLES_MODE:
        return asyncio.run(measure_nftables_mode(count, repeat))
    full, changed = ports(count), ports(count, moved=count // 2)
    results: dict[str, list[float]] = {"first": [], "resync": [], "change": []}
    size = 0
    for _ in range(repeat):
        composition.remove_rules()
        backend = PORTALS[name]()
        took, size = timed(backend, full, full=True)
        results["first"].append(took)
        results["resync"].append(timed(backend, full, full=True)[0])
        results["change"].append(timed(backend, changed, full=False)[0])
    composition.remove_rules()
    return {k: statistics.median(v) for k, v in results.items()} | {"rules": size}


async def measure_nftables_mode(count: int, repeat: int) -> dict[str, float]:
    """The provider's own syncs (plans, diff, one nft transaction), fed as the sources feed
    it: one endpoint per service port, NodePorts as in `ports()`."""
    services = [entry.port for entry in ports(count)]
    results: dict[str, list[float]] = {"first": [], "resync": [], "change": []}
    size = 0
    for _ in range(repeat):
        composition.remove_rules()
        now = [0.0]
        provider = NftablesProvider(
            settings=Settings(mode="nftables"),
            nft=ExecNftables(NftFamily.IP, nft_mode.TABLE),
            clock=functools.partial(operator.getitem, now, 0),
        )
        for port in services:
            provider.on_service(port.name.service, (port,))
            provider.on_endpoints(endpoints(port, "10.0.2.2"))
        started = time.perf_counter()
        await provider.sync()
        results["first"].append(time.perf_counter() - started)
        now[0] += 3600  # the sync period is over: the next sync rewrites everything
        provider.request_sync()
        started = time.perf_counter()
        await provider.sync()
        results["resync"].append(time.perf_counter() - started)
        now[0] += 1
        provider.on_endpoints(endpoints(services[count // 2], "10.0.2.2", "10.0.2.3"))
        started = time.perf_counter()
        await provider.sync()
        results["change"].append(time.perf_counter() - started)
        size = sum(len(p.chains) for p in provider._plans.values())  # chains written
        await provider.close()
    composition.remove_rules()
    return {k: statistics.median(v) for k, v in results.items()} | {"rules": size}


def endpoints(port: ServicePort, *ips: str) -> EndpointsResult:
    key = (port.name.port, port.protocol)
    infos = tuple(EndpointInfo(Endpoint(ip, 8080)) for ip in ips)
    return EndpointsResult(port.name.service, f"slice-{port.name.name}", {key: infos})


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
    print(
        "| service ports | rules (chains in nftables mode) | backend | first sync "
        "| full re-sync | one change |"
    )
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
