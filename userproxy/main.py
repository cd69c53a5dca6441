"""The composition root of `userproxy run`: settings in, a serving proxy out, until cancelled.

serve(settings)  picks the source (manifest files or the API server), builds the provider
                 of the mode (`userproxy.modes`), the health and metrics servers, and runs
                 the long-lived tasks (the source's watch, the sync loop) under
                 `tasks.first_exit`: if one of them ends, the process stops cleanly with a
                 non-zero exit instead of running half-alive.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from userproxy import modes, tasks
from userproxy.app import UserProxy
from userproxy.instance import InstanceLock
from userproxy.iptables.detect import host_iptables
from userproxy.provider import Provider, StartupError
from userproxy.serving.servers import ServerError, Servers
from userproxy.settings import Settings, to_options
from userproxy.sources.manifests import ManifestError, ManifestSource

log = structlog.get_logger("userproxy")

#: Exit codes: 1 cannot start or a long-lived task failed, 2 bad input (manifests, kubeconfig).
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


@contextlib.asynccontextmanager
async def prepared(settings: Settings) -> AsyncIterator[UserProxy]:
    """A proxy with its provider and its health and metrics servers, not yet started."""
    lock = InstanceLock() if settings.instance_lock else None
    try:
        provider = make_provider(settings, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    proxy = UserProxy(settings, proxy_name=settings.sources.service_proxy_name, provider=provider)
    servers = Servers(
        proxy,
        healthz_address=settings.healthz_bind_address,
        metrics_address=settings.metrics_bind_address,
        configz=configz(settings),
    )
    try:
        await servers.start()
    except ServerError as err:
        if settings.bind_address_hard_fail:
            await servers.stop()
            await proxy.close_unstarted()
            if lock is not None:
                lock.release()
            raise StartupError(str(err)) from err
        log.error("Continuing without the server that cannot bind.", reason=str(err))
    try:
        yield proxy
    finally:
        await servers.stop()
        await proxy.close_unstarted()
        if lock is not None:
            lock.release()


def configz(settings: Settings) -> dict[str, Any]:
    """The effective configuration, in option form, as /configz serves it."""
    from userproxy import config

    wanted = {option for option, _ in config.USED.values()}
    return {k: v for k, v in to_options(settings).items() if k in wanted}


def make_provider(settings: Settings, lock: InstanceLock | None = None) -> Provider:
    """The provider of `settings.mode` (see `userproxy.modes`). Raises StartupError when the
    host cannot run it as configured, or when another instance manages the rules."""

    def take_over_rules() -> None:
        if lock is not None:
            lock.acquire()
        remove_rules(keep=settings.mode)

    build: Callable[..., Provider] = modes.load(modes.MODES[settings.mode].provider)
    return build(settings, take_over_rules=take_over_rules)


def _rules_modules(keep: str | None = None) -> list[Any]:
    return [modes.load(mode.rules) for name, mode in modes.MODES.items() if name != keep]


def remove_rules(*, keep: str | None = None) -> int:
    """Remove every mode's rules (but `keep`'s) from both iptables variants. Idempotent."""
    hosts = host_iptables().values()
    return sum(module.cleanup(iptables) for module in _rules_modules(keep) for iptables in hosts)


def owned_rules_text() -> str:
    """Every rule any mode owns, in iptables-save form, per variant that has any."""
    hosts = host_iptables().values()
    return "".join(
        module.owned_rules_text(iptables) for module in _rules_modules() for iptables in hosts
    )


async def serve(settings: Settings) -> int:
    """Serve `settings.sources` until cancelled (exit code 0) or something fails."""
    try:
        if settings.sources.manifests:
            return await serve_manifests(settings, Path(settings.sources.manifests))
        return await serve_kubernetes(settings)
    except StartupError as err:
        log.error("Cannot start.", reason=str(err))
        return EXIT_FAILED


async def serve_manifests(settings: Settings, path: Path) -> int:
    """Serve the Services in `path`, reloading when the files change."""
    async with prepared(settings) as proxy:
        source = ManifestSource(path, proxy.router, on_change=proxy.runner.request)
        try:
            source.load()
        except ManifestError as err:
            log.error("Cannot read the manifests.", reason=str(err))
            return EXIT_BAD_INPUT
        return await _run(proxy, source.watch, manifests=str(path))


async def serve_kubernetes(settings: Settings) -> int:
    """Follow the API server and serve its Services."""
    from kubernetes_asyncio.config import ConfigException

    from userproxy.sources.kube import KubeSource, api_client

    connection = settings.client_connection
    try:
        api = await api_client(connection.kubeconfig or None, connection.master or None)
    except (ConfigException, OSError, ValueError) as err:
        log.error(
            "Cannot configure the API client.", kubeconfig=connection.kubeconfig, reason=str(err)
        )
        return EXIT_BAD_INPUT
    try:
        async with prepared(settings) as proxy:
            proxy.router.node_port_range = None  # the API server checked its own range
            source = KubeSource(
                api,
                proxy.router,
                on_change=proxy.runner.request,
                proxy_name=settings.sources.service_proxy_name,
                use_endpoints=settings.sources.use_endpoints,
            )
            # The first sync counts as queued from now: /healthz turns 503 if the API server
            # cannot be listed within twice the sync period.
            proxy.runner.request()
            log.info("Listing Services and endpoints.", server=source.server)
            await source.initial_list()
            return await _run(proxy, source.watch, server=source.server)
    finally:
        await api.close()


async def _run(proxy: UserProxy, watch: Callable[[], Awaitable[None]], **source: str) -> int:
    """Start the proxy and run the source's watch (restarted with backoff if it fails; health
    turns unhealthy while it keeps failing) and the sync loop (stopping with exit code 1 if
    it ever ends: it catches every failure of a sync itself)."""
    async with proxy:
        _log_running(proxy, **source)
        assert proxy.sync_task is not None
        watching = tasks.restarting(
            watch,
            name="source",
            on_failure=proxy.runner.stall,
            on_recovery=proxy.runner.unstall,
        )
        ended = await tasks.first_exit({"source": watching, "sync": proxy.sync_task})
    log.error(
        "A long-lived task ended; stopping.",
        task=ended.task,
        failed=ended.failed,
    )
    return EXIT_FAILED


def _log_running(proxy: UserProxy, **source: str) -> None:
    first_sync = proxy.runner.last_duration
    log.info(
        "userproxy is running.",
        **source,
        service_ports=len(proxy.service_ports()),
        first_sync_seconds=None if first_sync is None else round(first_sync, 3),
    )
