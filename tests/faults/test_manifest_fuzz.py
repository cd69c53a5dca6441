"""A manifest fuzzer: thousands of mutated Service, EndpointSlice, Endpoints and List
documents, as objects and as YAML text. Nothing in them may make the loader raise anything but
`ManifestError`, the router raise at all, a sync fail or a traceback be logged; and a valid
service keeps answering throughout. Seeded: a failure names its seed and case."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from tests.conftest import loopback_settings
from tests.helpers import TcpBackend, tcp_name
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service
from userproxy.sources.manifests import ManifestError, load_file

SEED = 20261201
CASES = 3000

ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 7, 65536, 10**30, 1.5, "", "x", "tcp", "UDP", "SCTP", "None",
    "10.0.0.1", "::1", "0.0.0.0", "127.0.0.1", "169.254.169.254", "255.255.255.255",
    "999.1.1.1", "a" * 300, [], {}, [1, 2], ["10.0.0.1", 5], {"a": 1}, {"ip": 3},
    [[[[[[]]]]]], {"name": {"name": {}}},
]  # fmt: skip
YAML_SNIPPETS = [
    "!!int abc", "!!bool maybe", "2024-02-30", "!!float x", "!!binary ====", "[" * 2000,
    "{a: 1, a: 2}", "&a [*a]", "!!python/object:os.system ls", "\t-", "kind: List\nitems: 5",
    "metadata: [1]", "metadata: {labels: 3}", "*undefined",
]  # fmt: skip


def base_documents() -> list[dict[str, Any]]:
    svc = service("fz", cluster_ip="10.96.7.7", ports=[("http", 80), ("dns", 53, "UDP")])
    svc["spec"]["externalIPs"] = ["192.0.2.10"]
    svc["spec"]["sessionAffinity"] = "ClientIP"
    svc["spec"]["ports"][0]["nodePort"] = 30007
    eps = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": "fz", "namespace": "default"},
        "subsets": [
            {
                "addresses": [{"ip": "10.244.0.9", "nodeName": "n1"}],
                "notReadyAddresses": [{"ip": "10.244.0.10"}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
        ],
    }
    slc = endpoint_slice("fz", addresses=["10.244.0.9", "10.244.0.10"], ports=[("http", 8080)])
    return [svc, slc, eps, {"apiVersion": "v1", "kind": "List", "items": [copy.deepcopy(svc)]}]


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += paths(value, (*prefix, index))
    return out


def mutate(doc: dict[str, Any], rng: random.Random) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths(doc))
        if not path:
            return rng.choice(ODD_VALUES)  # the whole document
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = rng.random()
        if action < 0.2 and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif action < 0.3 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))  # a duplicate entry
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
    return doc


@pytest.fixture
async def answering(backends: list[TcpBackend]) -> Any:
    proxy = UserProxy(loopback_settings())
    async with proxy:
        await proxy.apply(
            service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
            endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", backends[0].port)]),
        )
        yield proxy


async def test_mutated_objects_are_refused_and_never_raise(answering: UserProxy) -> None:
    rng = random.Random(SEED)
    bases = base_documents()
    with structlog.testing.capture_logs() as logs:
        for case in range(CASES):
            doc = mutate(rng.choice(bases), rng)
            try:
                answering.router.upsert(doc, origin=f"fuzz case {case}")
            except Exception as err:  # pragma: no cover - the failure being looked for
                pytest.fail(f"seed {SEED} case {case}: {type(err).__name__}: {err}\n{doc!r}")
            if case % 100 == 99:
                await answering.runner.run_once()
                assert await tcp_name(answering.proxy_port("default/web:http")) == "pod1"
    assert not [
        e for e in logs if "exc_info" in e or e["event"] == "Sync failed; it will be retried."
    ]
    assert answering.router.rejected > CASES // 4  # the fuzzer does reach the refusals


def test_mutated_yaml_only_ever_raises_manifest_error(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    bases = [yaml.safe_dump(doc) for doc in base_documents()]
    target = tmp_path / "fuzz.yaml"
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES // 3):
        text = rng.choice(bases)
        lines = text.splitlines()
        at = rng.randrange(len(lines))
        if rng.random() < 0.5:
            indent = len(lines[at]) - len(lines[at].lstrip())
            key = lines[at].strip().split(":")[0] or "x"
            lines[at] = " " * indent + f"{key}: {rng.choice(YAML_SNIPPETS)}"
        else:
            lines.insert(at, rng.choice(YAML_SNIPPETS))
        target.write_text("\n".join(lines) + "\n---\n" + rng.choice(bases))
        try:
            load_file(target)
            outcomes["loaded"] += 1
        except ManifestError:
            outcomes["refused"] += 1
        except Exception as err:  # pragma: no cover - the failure being looked for
            pytest.fail(f"seed {SEED} case {case}: {type(err).__name__}: {err}")
    assert outcomes["loaded"] and outcomes["refused"]
