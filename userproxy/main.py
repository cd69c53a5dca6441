"""The long-running jobs behind `userproxy run`, as coroutines the CLI (or a test) can run."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from userproxy.app import UserProxy
from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.interface import RulesError
from userproxy.iptables_mode import provider as iptables_mode
from userproxy.iptables_mode.provider import KernelProxier
from userproxy.iptables_mode.rules import KernelConfig
from userproxy.serving.servers import ServerError, Servers
from userproxy.settings import ProxySettings
from userproxy.sources.manifests import ManifestError, ManifestSource
from userproxy.userspace.portals import backends
from userproxy.userspace.portals.backends import BackendChoice
from userproxy.userspace.portals.manager import PortalManager
from userproxy.userspace.portals.rules import PortalConfig
from userproxy.userspace.proxier import Proxier
from userproxy.userspace.workers import WorkerPool, encode_state

log = structlog.get_logger("userproxy")


@dataclass(frozen=True)
class RunOptions:
    """What `userproxy run` needs besides the proxy settings."""

    proxy_name: str | None = None
    portal_config: PortalConfig | None = None
    masquerade_all: bool = False
    #: Extra `userproxy _worker` arguments (logging) for --workers.
    worker_args: tuple[str, ...] = ()
    iptables_backend: BackendChoice = "auto"
    healthz_address: str = "0.0.0.0:10256"
    metrics_address: str = "127.0.0.1:10249"
    bind_address_hard_fail: bool = False
    configz: Mapping[str, Any] = field(default_factory=dict)


class StartupError(Exception):
    pass


def make_portals(
    config: PortalConfig, choice: BackendChoice, full_sync_period: float = 30.0
) -> PortalManager:
    """A portal manager on the chosen backend, after clearing what the other variant may hold
    from an earlier run (rules of both variants would both be evaluated by the kernel), and
    what an earlier run in iptables mode left (a mode switch leaves nothing behind)."""
    iptables = backends.portal_iptables(choice)
    for variant, host in backends.host_iptables().items():
        if variant != iptables.variant:
            backends.cleanup(host)
        iptables_mode.cleanup(host)
    return PortalManager(
        chains=backends.portal_sync(iptables), config=config, full_sync_period=full_sync_period
    )


def make_kernel_proxier(settings: ProxySettings, run: RunOptions) -> KernelProxier:
    """iptables mode on the host's iptables variant, after removing the userspace mode's
    portals and any iptables-mode rules in the other variant."""
    variant = backends.choose_variant(run.iptables_backend)
    writer = iptables_mode.KernelRuleWriter(ExecIptables(variant))
    for other, host in backends.host_iptables().items():
        backends.cleanup(host)  # the userspace mode's portals
        if other != variant:
            iptables_mode.cleanup(host)
    log.info("Running in iptables mode.", backend=writer.iptables.name)
    if _sysctl("net/ipv4/ip_forward") == "0":
        log.warning(
            "net.ipv4.ip_forward is 0: the kernel will drop service traffic it DNATs to "
            "other hosts or pods; a Kubernetes node needs it set to 1."
        )
    config = KernelConfig(masquerade_all=run.masquerade_all)
    return KernelProxier(settings=settings, writer=writer, config=config)


def worker_arguments(settings: ProxySettings, run: RunOptions) -> list[str]:
    return [
        "--bind-address", settings.bind_address,
        "--udp-timeout", f"{settings.udp_idle_timeout}s",
        "--workers", str(settings.workers),
        *(["--allow-loopback"] if settings.allow_loopback_bind else []),
        *run.worker_args,
    ]  # fmt: skip


def _sysctl(name: str) -> str:
    try:
        return Path(f"/proc/sys/{name}").read_text().strip()
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def prepared(settings: ProxySettings, run: RunOptions) -> AsyncIterator[UserProxy]:
    """A proxy with its portals and its health and metrics servers, not yet started."""
    portals = None
    proxier = None
    try:
        if settings.mode == "iptables":
            proxier = make_kernel_proxier(settings, run)
        elif run.portal_config is not None:
            portals = make_portals(run.portal_config, run.iptables_backend, settings.sync_period)
    except RulesError as err:
        raise StartupError(
            f"cannot program iptables ({err}); run as root, or with --portals off"
        ) from err
    proxy = UserProxy(settings, proxy_name=run.proxy_name, portals=portals, proxier=proxier)
    pool = None
    if settings.workers > 1 and isinstance(proxy.proxier, Proxier):
        pool = WorkerPool(settings.workers, worker_arguments(settings, run))
        data_plane = proxy.proxier.data_plane
        pool.state = lambda: encode_state(data_plane())
        proxy.proxier.on_data_plane_change = pool.publish
        await pool.start()
    servers = Servers(
        proxy,
        healthz_address=run.healthz_address,
        metrics_address=run.metrics_address,
        configz=run.configz,
        worker_counters=pool.extra_counters if pool is not None else dict,
    )
    try:
        await servers.start()
    except ServerError as err:
        if run.bind_address_hard_fail:
            await servers.stop()
            if pool is not None:
                await pool.stop()
            raise StartupError(str(err)) from err
        log.error("Continuing without the server.", reason=str(err))
    try:
        yield proxy
    finally:
        await servers.stop()
        if pool is not None:
            await pool.stop()
        if proxy.runner.sync_count == 0:  # never started: UserProxy.stop() will not run
            if portals is not None:
                await portals.close()
            if proxier is not None:
                await proxier.shutdown()


async def serve_manifests(settings: ProxySettings, path: Path, run: RunOptions) -> int:
    """Serve the Services in `path` until cancelled, reloading when the files change."""
    try:
        async with prepared(settings, run) as proxy:
            source = ManifestSource(path, proxy.router, on_change=proxy.runner.request)
            try:
                source.load()
            except ManifestError as err:
                log.error("Cannot read the manifests.", reason=str(err))
                return 2
            async with proxy:
                _log_running(proxy, manifests=str(path))
                await source.watch()
    except StartupError as err:
        log.error("Cannot start.", reason=str(err))
        return 1
    return 0  # pragma: no cover - watch() only ends by cancellation


async def serve_kubernetes(
    settings: ProxySettings,
    run: RunOptions,
    *,
    kubeconfig: str | None,
    master: str | None,
    use_endpoints: bool = False,
) -> int:
    """Follow the API server and serve its Services until cancelled."""
    from kubernetes_asyncio.config import ConfigException

    from userproxy.sources.kube import KubeSource, api_client

    try:
        api = await api_client(kubeconfig, master)
    except (ConfigException, OSError, ValueError) as err:
        log.error("Cannot configure the API client.", kubeconfig=kubeconfig, reason=str(err))
        return 2
    try:
        async with prepared(settings, run) as proxy:
            source = KubeSource(
                api,
                proxy.router,
                on_change=proxy.runner.request,
                proxy_name=run.proxy_name,
                use_endpoints=use_endpoints,
            )
            # The first sync counts as queued from now: /healthz turns 503 if the API server
            # cannot be listed within twice the sync period.
            proxy.runner.request()
            log.info("Listing Services and endpoints.", server=source.server)
            await source.initial_list()
            async with proxy:
                _log_running(proxy, server=source.server)
                await source.watch()
    except StartupError as err:
        log.error("Cannot start.", reason=str(err))
        return 1
    finally:
        await api.close()
    return 0  # pragma: no cover - watch() only ends by cancellation


def _log_running(proxy: UserProxy, **source: str) -> None:
    first_sync = proxy.runner.last_duration
    log.info(
        "userproxy is running.",
        **source,
        service_ports=len(proxy.service_ports()),
        first_sync_seconds=None if first_sync is None else round(first_sync, 3),
    )
