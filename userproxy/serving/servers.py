"""The health server (`--healthz-bind-address`, default 0.0.0.0:10256) and the metrics server
(`--metrics-bind-address`, default 127.0.0.1:10249), on the proxy's own event loop.

  health   /healthz /livez     kube-proxy's JSON {lastUpdated, currentTime[, nodeEligible]},
                               200 or 503, X-Content-Type-Options: nosniff
  metrics  /metrics            Prometheus text
           /healthz            plain "ok" (the process answers)
           /proxyMode          "userspace"
           /configz            the effective configuration, JSON
           /status             the served service ports and endpoints, JSON (`userproxy ls`)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from userproxy.app import UserProxy
from userproxy.handover.adoption import Adoption
from userproxy.handover.protocol import server_key
from userproxy.serving import health, status
from userproxy.serving.metrics import Metrics
from userproxy.settings import split_address

log = structlog.get_logger("userproxy.serving.servers")


class ServerError(RuntimeError):
    pass


class Servers:
    def __init__(
        self,
        proxy: UserProxy,
        *,
        healthz_address: str = "0.0.0.0:10256",
        metrics_address: str = "127.0.0.1:10249",
        configz: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        adoption: Adoption | None = None,
    ) -> None:
        self.proxy = proxy
        self.metrics = Metrics(proxy)
        self.healthz_address = healthz_address
        self.metrics_address = metrics_address
        self.configz = dict(configz or {})
        self.clock = clock
        #: What each server is bound to, once started (port 0 picks one).
        self.bound: dict[str, tuple[str, int]] = {}
        self._runners: list[web.AppRunner] = []
        #: Listening descriptors by server name, for a successor to take over.
        self.fds: dict[str, int] = {}
        self._adoption = adoption

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start both servers; one that cannot bind does not keep the other from starting
        (raised, naming every one that failed, once both were tried)."""
        failures = []
        for name, address, app in (
            ("healthz", self.healthz_address, self._health_app),
            ("metrics", self.metrics_address, self._metrics_app),
        ):
            if address:
                try:
                    await self._serve(name, address, app())
                except ServerError as err:
                    failures.append(str(err))
        if failures:
            raise ServerError("; ".join(failures))

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.fds.clear()

    def handover_fds(self) -> list[tuple[str, int]]:
        return [(server_key(name), fd) for name, fd in self.fds.items()]

    async def _serve(self, name: str, address: str, app: web.Application) -> None:
        try:
            host, port = split_address(address)
        except ValueError as err:
            raise ServerError(str(err)) from None
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        inherited = self._adoption.take(server_key(name)) if self._adoption else None
        site: web.BaseSite
        if inherited is not None:  # the predecessor's listening socket, as it was bound
            site = web.SockSite(runner, inherited)
        else:
            site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise ServerError(f"cannot serve {name} on {address}: {err.strerror}") from err
        self._runners.append(runner)
        sockets = getattr(site._server, "sockets", None) or ()
        self.bound[name] = sockets[0].getsockname()[:2] if sockets else (host, port)
        if sockets:
            self.fds[name] = sockets[0].fileno()
        log.info(f"Serving {name}.", address=f"{self.bound[name][0]}:{self.bound[name][1]}")

    # ------------------------------------------------------------------ health
    def health(self) -> health.Health:
        runner, settings = self.proxy.runner, self.proxy.settings
        return health.check(
            queued_at=runner.pending_since,
            synced_at=runner.synced_at,
            now=self.clock(),
            timeout=2 * settings.sync_period,
        )

    def _health_app(self) -> web.Application:
        async def healthz(request: web.Request) -> web.Response:
            verdict = self.health()
            self.metrics.healthz.labels(str(verdict.code)).inc()
            return _json(verdict.body(node_eligible=True), verdict.code)

        async def livez(request: web.Request) -> web.Response:
            verdict = self.health()
            self.metrics.livez.labels(str(verdict.code)).inc()
            return _json(verdict.body(), verdict.code)

        async def readyz(request: web.Request) -> web.Response:
            """Ready once the first sync has programmed everything, and healthy since: a
            readiness probe on it says when a new process (a rollout's new pod) serves."""
            verdict = self.health()
            ready = verdict.healthy and self.proxy.runner.sync_count > 0
            body = {**verdict.body(), "firstSyncDone": self.proxy.runner.sync_count > 0}
            return _json(body, 200 if ready else 503)

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/livez", livez)
        return app

    # ------------------------------------------------------------------ metrics and status
    async def status(self) -> status.Status:
        return status.to_json(await self.proxy.read_status())

    def _metrics_app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def proxy_mode(request: web.Request) -> web.Response:
            return web.Response(text=self.proxy.provider.mode)

        async def configz(request: web.Request) -> web.Response:
            return _json({"kubeproxy.config.k8s.io": self.configz}, 200)

        async def status_view(request: web.Request) -> web.Response:
            return _json(await self.status(), 200)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", ok)
        app.router.add_get("/proxyMode", proxy_mode)
        app.router.add_get("/configz", configz)
        app.router.add_get("/status", status_view)
        return app


def _json(body: Mapping[str, Any], code: int) -> web.Response:
    return web.json_response(
        body, status=code, headers={"X-Content-Type-Options": "nosniff"}, dumps=_dumps
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
