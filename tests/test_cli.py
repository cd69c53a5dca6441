"""The real `userproxy` command as users run it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import LOCAL, TcpBackend, tcp_name, wait_for
from userproxy.objects import endpoint_slice, service

USERPROXY = [sys.executable, "-m", "userproxy"]
#: Keep root test runs away from the host's iptables: these tests never need portals.
NO_ROOT_FLAGS = [
    "--portals",
    "off",
    "--healthz-bind-address",
    "127.0.0.1:0",
    "--metrics-bind-address",
    "127.0.0.1:0",
]


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*USERPROXY, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bind-address", "127.0.0.1"], "cannot proxy on localhost"),
        (["--bind-address", "nonsense"], "is not an IP address"),
        (["--udp-timeout", "0"], "udp-timeout must be greater than zero"),
        (["--udp-timeout", "fast"], "invalid duration"),
        (["--proxy-port-range", "9-2"], "invalid port range"),
        ([], "give --manifests PATH, --kubeconfig FILE or --master URL"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(args: list[str], message: str) -> None:
    result = cli("run", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_unreadable_manifest_path_exits_non_zero(tmp_path: Path) -> None:
    result = cli("run", "--manifests", str(tmp_path / "missing.yaml"), "--log-format", "json")
    assert result.returncode == 2
    assert "no such file or directory" in result.stderr


def test_demo_balances_connections() -> None:
    result = cli("demo", "--connections", "6")
    assert result.returncode == 0, result.stderr
    assert "6 connections" in result.stdout
    assert "backend-1: 2, backend-2: 2, backend-3: 2" in result.stdout
    assert "backend-1: 3, backend-2: 3" in result.stdout


class RunningProxy:
    def __init__(self, proc: asyncio.subprocess.Process, log: list[dict[str, object]]) -> None:
        self.proc = proc
        self.log = log

    def proxy_port(self, service_port: str) -> int | None:
        for event in reversed(self.log):
            if event.get("service") == service_port and "proxy_port" in event:
                return int(event["proxy_port"])  # type: ignore[call-overload]
        return None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture
async def run_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    procs: list[asyncio.subprocess.Process] = []
    readers: list[asyncio.Task[None]] = []

    async def start(manifest: list[dict[str, object]], *flags: str) -> RunningProxy:
        path = tmp_path / "manifests.yaml"
        path.write_text(yaml.safe_dump_all(manifest))
        proc = await asyncio.create_subprocess_exec(
            *USERPROXY,
            "run",
            "--manifests",
            str(path),
            "--log-format",
            "json",
            "-v",
            "--bind-address",
            "0.0.0.0",
            *NO_ROOT_FLAGS,
            *flags,
            stderr=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
        log: list[dict[str, object]] = []

        async def read() -> None:
            assert proc.stderr is not None
            while line := await proc.stderr.readline():
                try:
                    log.append(yaml.safe_load(line))
                except yaml.YAMLError:
                    log.append({"raw": line.decode()})

        readers.append(asyncio.get_running_loop().create_task(read()))
        running = RunningProxy(proc, log)
        await wait_for(
            lambda: any(e.get("event") == "userproxy is running." for e in log),
            timeout=15,
            what=f"proxy start: {log}",
        )
        return running

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
    for reader in readers:
        await reader


async def test_run_manifests_serves_and_stops_cleanly(
    run_proxy: Callable[..., object], backends: list[TcpBackend]
) -> None:
    manifest = [
        service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
        endpoint_slice("web", addresses=[LOCAL], ports=[("http", backends[0].port)]),
    ]
    proxy: RunningProxy = await run_proxy(manifest)  # type: ignore[assignment]
    port = proxy.proxy_port("default/web:http")
    assert port is not None
    assert await tcp_name(port) == "pod1"
    proxy.proc.terminate()
    assert await asyncio.wait_for(proxy.proc.wait(), 10) == 0


async def test_slow_reader_does_not_grow_proxy_memory(run_proxy: Callable[..., object]) -> None:
    """256 MiB from a fast backend to a client reading slowly: the proxy's RSS stays flat."""
    total = 256 * 1024 * 1024
    chunk = os.urandom(1024 * 1024)

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    backend = await TcpBackend("fast").start(firehose)
    manifest = [
        service("bulk", cluster_ip="10.96.0.20", ports=[("data", 80)]),
        endpoint_slice("bulk", addresses=[LOCAL], ports=[("data", backend.port)]),
    ]
    proxy: RunningProxy = await run_proxy(manifest)  # type: ignore[assignment]
    port = proxy.proxy_port("default/bulk:data")
    assert port is not None
    reader, writer = await asyncio.open_connection(LOCAL, port, limit=64 * 1024)
    await asyncio.sleep(0.3)
    baseline = proxy.rss_kib()
    peak, received = baseline, 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    while received < total and loop.time() < deadline:
        data = await reader.read(128 * 1024)
        if not data:
            break
        received += len(data)
        await asyncio.sleep(0.002)  # at most ~64 MB/s: far slower than the backend sends
        if received % (8 * 1024 * 1024) < len(data):
            peak = max(peak, proxy.rss_kib())
    writer.close()
    await backend.stop()
    assert received == total
    print(f"proxy RSS growth during 256 MiB to a slow reader: {(peak - baseline) / 1024:.1f} MiB")
    assert (peak - baseline) < 16 * 1024, f"RSS grew by {(peak - baseline) / 1024:.1f} MiB"


def test_config_file_flags_override_it_and_write_config_to(tmp_path: Path) -> None:
    source = tmp_path / "kube-proxy.yaml"
    source.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "bindAddress: 10.0.0.5\n"
        "udpIdleTimeout: 2s\n"
        "iptables: {syncPeriod: 1m0s, minSyncPeriod: 2s}\n"
        "ipvs: {scheduler: rr}\n"
    )
    written = tmp_path / "effective.yaml"
    result = cli(
        "run", "--config", str(source), "--udp-timeout", "5s", "--write-config-to", str(written)
    )
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(written.read_text())
    assert effective["kind"] == "KubeProxyConfiguration"
    assert effective["bindAddress"] == "10.0.0.5"  # from the file
    assert effective["udpIdleTimeout"] == "5s"  # the flag wins
    assert effective["iptables"] == {
        "syncPeriod": "60s",
        "minSyncPeriod": "2s",
        "masqueradeAll": False,
    }
    assert effective["healthzBindAddress"] == "0.0.0.0:10256"  # a default


def test_a_bad_config_file_names_the_field(tmp_path: Path) -> None:
    source = tmp_path / "kube-proxy.yaml"
    source.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "iptables: {syncPeriod: sometimes}\n"
    )
    result = cli("run", "--config", str(source), "--manifests", str(tmp_path))
    assert result.returncode == 2
    assert "iptables.syncPeriod: invalid duration 'sometimes'" in result.stderr


@pytest.fixture
def in_process_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI run in this process configures logging for its captured streams: put the
    configuration back afterwards, and pretend not to be root."""
    import logging

    import structlog

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    handlers = logging.getLogger().handlers[:]
    config = structlog.get_config()
    yield
    logging.getLogger().handlers[:] = handlers
    structlog.configure(**config)


@pytest.mark.usefixtures("in_process_cli")
@pytest.mark.parametrize("command", [["rules"], ["cleanup"], ["run", "--cleanup"]])
def test_rules_and_cleanup_need_root(command: list[str]) -> None:
    from click.testing import CliRunner

    from userproxy.cli import main

    result = CliRunner().invoke(main, command)
    assert result.exit_code == 1
    assert "needs root" in result.output


@pytest.mark.usefixtures("in_process_cli")
def test_portals_on_without_root_refuses_to_start(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from userproxy.cli import main

    manifests = tmp_path / "svc.yaml"
    manifests.write_text(yaml.safe_dump(service("web", cluster_ip="10.96.0.10", ports=[("", 80)])))
    args = ["run", "--manifests", str(manifests), "--portals", "on", "--log-format", "json",
            "--healthz-bind-address", "", "--metrics-bind-address", ""]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "--portals on writes iptables rules: run it as root" in result.output


@pytest.mark.usefixtures("in_process_cli")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--healthz-bind-address", "garbage"], "healthz-bind-address: 'garbage' is not host:port"),
        (["--metrics-bind-address", "name:80"], "'name' is not an IP address"),
        (["--kubeconfig", "/x"], "give either --manifests or an API server"),
        (["--nodeport-addresses", "notacidr"], "'notacidr' is not a CIDR"),
    ],
)
def test_bad_flags_are_usage_errors_without_a_traceback(
    args: list[str], message: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from userproxy.cli import main

    manifests = tmp_path / "svc.yaml"
    manifests.write_text("")
    result = CliRunner().invoke(main, ["run", "--manifests", str(manifests), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("in_process_cli")
def test_ls_with_a_bad_address_and_config_to_stdout(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from userproxy.cli import main

    result = CliRunner().invoke(main, ["ls", "--address", "garbage"])
    assert result.exit_code == 2 and "'garbage' is not host:port" in result.output
    manifests = tmp_path / "svc.yaml"
    manifests.write_text("")
    args = ["run", "--manifests", str(manifests), "--udp-timeout", "5s", "--write-config-to", "-"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0
    assert "udpIdleTimeout: 5s" in result.output
    assert not (Path.cwd() / "-").exists()


def test_console_logs_into_a_pipe_have_no_colour_codes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "userproxy", "run", "--log-format", "console",
         "--manifests", str(tmp_path / "missing.yaml"), "--portals", "off"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and result.stderr
    assert "\x1b[" not in result.stderr


def test_the_readme_lists_every_run_flag_as_the_code_defines_it() -> None:
    from userproxy import flagtable

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert flagtable.in_readme(readme) == flagtable.table(), (
        "README's flag table is stale: regenerate it with python -m userproxy.flagtable"
    )


def free_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def tmux(args: list[str], *, check: bool = True) -> str:
    return subprocess.run(
        ["tmux", *args], capture_output=True, text=True, check=check, timeout=10
    ).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_ls_watch_in_a_real_terminal_shows_rates(
    run_proxy: Callable[..., object], backends: list[TcpBackend], tmp_path: Path
) -> None:
    """`ls --watch` in a tmux pane (a real terminal): the table refreshes with per-second
    rates while connections go through; read back with capture-pane."""
    metrics = f"{LOCAL}:{free_local_port()}"
    manifest = [
        service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
        endpoint_slice("web", addresses=[LOCAL], ports=[("http", backends[0].port)]),
    ]
    proxy: RunningProxy = await run_proxy(manifest, "--metrics-bind-address", metrics)  # type: ignore[assignment]
    port = proxy.proxy_port("default/web:http")
    assert port is not None
    session = f"upls{os.getpid()}"
    command = " ".join([*USERPROXY, "ls", "--address", metrics, "--watch", "0.5"])
    tmux(["new-session", "-d", "-s", session, "-x", "160", "-y", "40", command])
    try:
        screen = ""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while loop.time() < deadline:
            for _ in range(5):
                assert await tcp_name(port) == "pod1"
            await asyncio.sleep(0.3)
            screen = await asyncio.to_thread(tmux, ["capture-pane", "-p", "-t", session])
            rows = [ln for ln in screen.splitlines() if ln.strip().startswith("-> 127.0.0.1")]
            if "Conn/s" in screen and rows and rows[0].split()[5] not in ("0", "0.0"):
                break
        else:
            pytest.fail(f"no rate appeared:\n{screen}")
        assert screen.count("Every 0.5s") == 1  # redrawn in place, not appended
        assert "\x1b" not in screen
    finally:
        tmux(["kill-session", "-t", session], check=False)
