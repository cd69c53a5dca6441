"""`--manifests`: multi-document files, directories, bad input, reloads."""

from __future__ import annotations

import asyncio
import errno
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


@pytest.mark.parametrize(
    "text",
    [
        "kind: Service\nmetadata: {creationTimestamp: 2024-02-30}\n",  # ValueError in PyYAML
        "kind: Service\nspec: {ports: [{port: !!int abc}]}\n",
        "kind: Service\nspec: {x: !!bool maybe}\n",  # KeyError in PyYAML
        "kind: Service\nspec: " + "[" * 5000 + "]" * 5000 + "\n",  # RecursionError
    ],
)
def test_impossible_values_are_a_manifest_error_naming_the_document(
    tmp_path: Path, text: str
) -> None:
    f = tmp_path / "odd.yaml"
    f.write_text(
        service("ok", cluster_ip="10.96.0.1", ports=[("", 80)]).__repr__() + "\n---\n" + text
    )
    with pytest.raises(ManifestError, match=r"odd\.yaml: document 1"):
        load_file(f)


def test_a_list_whose_items_are_not_a_list_is_skipped(tmp_path: Path) -> None:
    f = tmp_path / "list.yaml"
    write(f, {"kind": "List", "items": 5}, service("a", cluster_ip="10.96.0.1", ports=[("", 80)]))
    with capture_logs() as logs:
        assert [o["metadata"]["name"] for o, _ in load_file(f)] == ["a"]
    assert any("items are not a list" in e["event"] for e in logs)


def test_a_path_that_cannot_be_read_is_a_manifest_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from userproxy.sources.manifests import manifest_files

    def out_of_descriptors(self: Path, pattern: str) -> object:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(Path, "rglob", out_of_descriptors)
    with pytest.raises(ManifestError, match="Too many open files"):
        manifest_files(tmp_path)


async def test_the_watch_survives_a_scan_that_fails_and_logs_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from userproxy.sources import manifests

    f = tmp_path / "svc.yaml"
    write(f, service("a", cluster_ip="10.96.0.1", ports=[("", 80)]))
    async with UserProxy(loopback_settings()) as proxy:
        source = ManifestSource(tmp_path, proxy.router, poll_interval=0.01)
        source.load()
        real, failures = manifests.manifest_files, 0

        def flaky(path: Path) -> list[Path]:
            nonlocal failures
            if failures < 20:
                failures += 1
                raise ManifestError(f"{path}: Too many open files")
            return real(path)

        monkeypatch.setattr(manifests, "manifest_files", flaky)
        watch = asyncio.ensure_future(source.watch())
        with capture_logs() as logs:
            await wait_for(lambda: failures == 20, 5, "the failing scans")
            write(f, service("b", cluster_ip="10.96.0.2", ports=[("", 80)]))
            await wait_for(lambda: source.loads == 2, 5, "the reload after the fault")
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and "Too many open files" in errors[0]["reason"]
