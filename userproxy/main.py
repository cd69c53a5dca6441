"""The long-running jobs behind `userproxy run`, as coroutines the CLI (or a test) can run."""

from __future__ import annotations

from pathlib import Path

import structlog

from userproxy.app import UserProxy
from userproxy.settings import ProxySettings
from userproxy.sources.manifests import ManifestError, ManifestSource

log = structlog.get_logger("userproxy")


async def serve_manifests(
    settings: ProxySettings, path: Path, *, proxy_name: str | None = None
) -> int:
    """Serve the Services in `path` until cancelled, reloading when the files change."""
    proxy = UserProxy(settings, proxy_name=proxy_name)
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
