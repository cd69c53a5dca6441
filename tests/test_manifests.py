"""`--manifests`: multi-document files, directories, bad input, reloads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from tests.conftest import loopback_settings
from tests.helpers import LOCAL, TcpBackend, tcp_name, wait_for
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service
from userproxy.sources.manifests import ManifestError, ManifestSource, load_file


def write(path: Path, *docs: object) -> None:
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))


def test_multi_document_file_and_lists_and_other_kinds(tmp_path: Path) -> None:
    f = tmp_path / "app.yaml"
    write(
        f,
        {"kind": "Deployment", "metadata": {"name": "x"}},
        service("a", cluster_ip="10.96.0.1", ports=[("", 80)]),
        None,
        {"kind": "List", "items": [service("b", cluster_ip="10.96.0.2", ports=[("", 80)])]},
    )
    loaded = load_file(f)
    assert [(o["metadata"]["name"], origin) for o, origin in loaded] == [
        ("a", f"{f}: document 1"),
        ("b", f"{f}: document 3"),
    ]


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("kind: Service\nmetadata: {name: [unclosed\n")
    with pytest.raises(ManifestError, match=r"bad\.yaml"):
        load_file(f)


async def test_bad_documents_are_reported_and_skipped(
    tmp_path: Path, backends: list[TcpBackend]
) -> None:
    backend = backends[0]
    good = [
        service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
        endpoint_slice("web", addresses=[LOCAL], ports=[("http", backend.port)]),
    ]
    bad = service("broken", namespace="shop", cluster_ip="10.96.0.11", ports=[("http", 99999)])
    write(tmp_path / "svc.yaml", *good, bad, ["not", "an", "object"])
    async with UserProxy(loopback_settings()) as proxy:
        source = ManifestSource(tmp_path, proxy.router)
        with capture_logs() as logs:
            source.load()
            await proxy.runner.run_once()
        errors = sorted((e for e in logs if e["log_level"] == "error"), key=lambda e: e["origin"])
        assert len(errors) == 2
        assert errors[0]["origin"] == f"{tmp_path / 'svc.yaml'}: document 2"
        assert "Service shop/broken" in errors[0]["reason"]
        assert "99999" in errors[0]["reason"]
        assert errors[1]["origin"] == f"{tmp_path / 'svc.yaml'}: document 3"
        assert await tcp_name(proxy.proxy_port("default/web:http")) == "pod1"


async def test_reload_follows_file_changes_and_keeps_state_on_broken_files(
    tmp_path: Path, backends: list[TcpBackend]
) -> None:
    pods = backends
    f = tmp_path / "svc.yaml"
    svc = service("web", cluster_ip="10.96.0.10", ports=[("http", 80)])
    write(f, svc, endpoint_slice("web", addresses=[LOCAL], ports=[("http", pods[0].port)]))
    async with UserProxy(loopback_settings()) as proxy:
        source = ManifestSource(
            tmp_path, proxy.router, poll_interval=0.02, on_change=proxy.runner.request
        )
        source.load()
        await proxy.runner.run_once()
        watcher = asyncio.get_running_loop().create_task(source.watch())
        port = proxy.proxy_port("default/web:http")
        assert await tcp_name(port) == "pod1"
        # An endpoint change reaches new connections without a service sync.
        write(f, svc, endpoint_slice("web", addresses=[LOCAL], ports=[("http", pods[1].port)]))
        await wait_for(lambda: source.loads == 2, what="reload")
        assert await tcp_name(port) == "pod2"
        # A half-written file is reported; what it held before keeps being served.
        f.write_text("kind: Service\nmetadata: {name: [\n")
        await wait_for(lambda: source.loads == 3, what="reload of the broken file")
        assert await tcp_name(port) == "pod2"
        # The file removed: its services go away.
        f.unlink()
        await wait_for(lambda: source.loads == 4, what="reload after removal")
        await wait_for(lambda: proxy.service_ports() == [], what="service removed")
        watcher.cancel()


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    from userproxy.sources.manifests import manifest_files

    with pytest.raises(ManifestError, match="no such file"):
        manifest_files(tmp_path / "nope")
