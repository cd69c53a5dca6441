"""One instance per node: a second `userproxy run` that would manage the same chains refuses
to start and names the running one; once that one is gone, the next starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.netns.topology import bare
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def start(netns: str, manifests: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "userproxy", "run",
         "--manifests", str(manifests), "--portals", "on", "--log-format", "json",
         "--healthz-bind-address", "", "--metrics-bind-address", "", *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def wait_running(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None  # the proxy logs to stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "userproxy is running." in line:
            return
        assert line or proc.poll() is None, "the first instance ended"
    raise AssertionError("the first instance never said it was running")


def test_a_second_instance_refuses_to_start(tmp_path: Path) -> None:
    manifests = tmp_path / "svc.yaml"
    manifests.write_text(
        yaml.safe_dump_all(
            [
                service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
                endpoint_slice("web", addresses=["10.244.0.2"], ports=[("http", 8080)]),
            ]
        )
    )
    with bare("i") as netns:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        with start(netns, manifests) as first:
            try:
                wait_running(first)
                with start(netns, manifests, "--no-take-over") as second:
                    _, err = second.communicate(timeout=20)
                assert second.returncode == 1
                assert f"another userproxy (pid {first.pid})" in err
                rules = subprocess.run(
                    ["ip", "netns", "exec", netns, "iptables-save", "-t", "nat"],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                assert "10.96.0.10/32" in rules  # the first one's portals are untouched
            finally:
                first.terminate()
                first.communicate(timeout=20)
        with start(netns, manifests) as third:
            try:
                wait_running(third)
            finally:
                third.terminate()
                third.communicate(timeout=20)
