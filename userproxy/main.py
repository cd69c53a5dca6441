"""The long-running jobs behind `userproxy run`, as coroutines the CLI (or a test) can run."""

from __future__ import annotations

from pathlib import Path

import structlog

from userproxy.app import UserProxy
from userproxy.portals.backends import (
    BackendChoice,
    IptcBackend,
    RulesError,
    cleanup_variant,
    make_backend,
)
from userproxy.portals.manager import PortalManager
from userproxy.portals.rules import PortalConfig
from userproxy.settings import ProxySettings
from userproxy.sources.manifests import ManifestError, ManifestSource

log = structlog.get_logger("userproxy")


async def serve_manifests(
    settings: ProxySettings,
    path: Path,
    *,
    proxy_name: str | None = None,
    portal_config: PortalConfig | None = None,
    iptables_backend: BackendChoice = "auto",
) -> int:
    """Serve the Services in `path` until cancelled, reloading when the files change."""
    portals = None
    if portal_config is not None:
        try:
            portals = make_portals(portal_config, iptables_backend, settings.sync_period)
        except RulesError as err:
            log.error(
                "Cannot program iptables; run as root, or with --portals off.", reason=str(err)
            )
            return 1
    proxy = UserProxy(settings, proxy_name=proxy_name, portals=portals)
    source = ManifestSource(path, proxy.router, on_change=proxy.runner.request)
    try:
        source.load()
    except ManifestError as err:
        log.error("Cannot read the manifests.", reason=str(err))
        return 2
    async with proxy:
        log.info(
            "userproxy is running.", manifests=str(path), service_ports=len(proxy.service_ports())
        )
        await source.watch()
    return 0  # pragma: no cover - watch() only ends by cancellation


def make_portals(
    config: PortalConfig, choice: BackendChoice, full_sync_period: float = 30.0
) -> PortalManager:
    """A portal manager on the chosen backend, after clearing what the other variant may hold
    from an earlier run (rules of both variants would both be evaluated by the kernel)."""
    backend = make_backend(choice)
    cleanup_variant("nft" if isinstance(backend, IptcBackend) else "legacy")
    return PortalManager(backend=backend, config=config, full_sync_period=full_sync_period)
