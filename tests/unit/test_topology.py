"""Topology-aware routing: which endpoints cluster traffic may use, given the hints, for
every combination upstream distinguishes (kube-proxy's topology fallbacks)."""

from __future__ import annotations

import pytest

from userproxy import convert
from userproxy.model import Endpoint, EndpointInfo, Topology, usable_endpoints
from userproxy.objects import endpoint_slice

A1, A2, B1 = Endpoint("10.0.1.1", 80), Endpoint("10.0.1.2", 80), Endpoint("10.0.2.1", 80)
HERE = Topology(node="node-a1", zone="zone-a")


def info(ep: Endpoint, zones: tuple[str, ...] | None, nodes: tuple[str, ...] | None = None,
         ready: bool = True) -> EndpointInfo:  # fmt: skip
    return EndpointInfo(ep, ready=ready, serving=True, zones=zones, nodes=nodes)


@pytest.mark.parametrize(
    ("infos", "expected"),
    [
        # every endpoint hinted, one for our zone: only those
        ([info(A1, ("zone-a",)), info(A2, ("zone-a",)), info(B1, ("zone-b",))], [A1, A2]),
        # hints partial (the controller is mid-update): everything
        ([info(A1, ("zone-a",)), info(B1, None)], [A1, B1]),
        # no hint names our zone: everything
        ([info(A1, ("zone-c",)), info(B1, ("zone-b",))], [A1, B1]),
        # node hints win when one names this node
        (
            [
                info(A1, ("zone-a",), ("node-a1",)),
                info(A2, ("zone-a",), ("node-a2",)),
                info(B1, ("zone-b",), ("node-b1",)),
            ],
            [A1],
        ),
        # node hints for other nodes only: zone hints decide
        ([info(A1, ("zone-a",), ("node-a2",)), info(B1, ("zone-b",), ("node-b1",))], [A1]),
        # a not-ready endpoint does not count, hinted or not
        ([info(A1, ("zone-a",)), info(A2, None, ready=False), info(B1, ("zone-b",))], [A1]),
    ],
)
def test_hints_narrow_cluster_traffic(infos: list[EndpointInfo], expected: list[Endpoint]) -> None:
    assert usable_endpoints(infos, topology=HERE) == expected


def test_no_zone_known_ignores_zone_hints() -> None:
    infos = [info(A1, ("zone-a",)), info(B1, ("zone-b",))]
    assert usable_endpoints(infos, topology=Topology(node="n", zone="")) == [A1, B1]


def test_internal_traffic_policy_local_is_not_narrowed_further() -> None:
    infos = [EndpointInfo(A1, node_name="node-a1", zones=("zone-b",)),
             EndpointInfo(B1, node_name="node-b1", zones=("zone-a",))]  # fmt: skip
    assert usable_endpoints(infos, local_node="node-a1", topology=HERE) == [A1]


def test_slice_hints_are_read_and_malformed_ones_refused() -> None:
    obj = endpoint_slice("web", addresses=["10.0.1.1"], ports=[("http", 80)])
    obj["endpoints"][0]["hints"] = {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "n1"}]}
    ((infos),) = convert.endpoint_slice(obj).ports.values()
    assert infos[0].zones == ("zone-a",) and infos[0].nodes == ("n1",)
    obj["endpoints"][0]["hints"] = {"forZones": ["zone-a"]}
    with pytest.raises(convert.InvalidObject, match="forZones"):
        convert.endpoint_slice(obj)
