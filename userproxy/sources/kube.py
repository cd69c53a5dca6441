"""The Kubernetes source: list and watch Services and EndpointSlices (or core/v1 Endpoints)
through kubernetes-asyncio, and feed every change to the object router.

One reflector per resource, each an informer in miniature:
- LIST (all namespaces, label-selected like kube-proxy), then WATCH from the list's
  resourceVersion with bookmarks. Every event moves the remembered version forward.
- 410 Gone, on the request or inside the stream: relist, and hand the router the whole new
  list, which applies the difference; objects deleted while we were away are seen as deleted.
- A dropped connection, a server that is down, a 5xx, a silent connection (read timeout):
  re-watch from the last version after a jittered exponential backoff. Meanwhile the router
  keeps the last known state and the proxy keeps serving it.

Watch streams are read as raw JSON lines (`_preload_content=False`): the router works on the
objects as the API sends them, and building kubernetes-asyncio model objects for every event
only to turn them back into dicts would double the cost of a large EndpointSlice.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import structlog
from kubernetes_asyncio import client, config

from userproxy import convert
from userproxy.sources.router import ObjectKey, object_key

log = structlog.get_logger("userproxy.kube")

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Resource:
    """A watched resource, and the API call that reads it (also the source of the RBAC rules
    the deployment grants: see `api_calls`)."""

    kind: str
    group: str  # "" is the core group
    version: str
    plural: str
    api_class: str
    list_method: str


SERVICES = Resource("Service", "", "v1", "services", "CoreV1Api", "list_service_for_all_namespaces")
ENDPOINT_SLICES = Resource(
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    "DiscoveryV1Api",
    "list_endpoint_slice_for_all_namespaces",
)
ENDPOINTS = Resource(
    "Endpoints", "", "v1", "endpoints", "CoreV1Api", "list_endpoints_for_all_namespaces"
)
VERBS = ("list", "watch")


def watched(use_endpoints: bool) -> tuple[Resource, ...]:
    return (SERVICES, ENDPOINTS if use_endpoints else ENDPOINT_SLICES)


def api_calls(use_endpoints: bool = False) -> list[tuple[str, str, str]]:
    """(API group, resource, verb) for every request this source makes (the Node read is
    `node_zone`'s)."""
    calls = [(r.group, r.plural, verb) for r in watched(use_endpoints) for verb in VERBS]
    return [*calls, ("", "nodes", "get")]


def label_selector(resource: Resource, proxy_name: str | None) -> str:
    """kube-proxy's informer selectors: never headless endpoints; Services labelled with a
    proxy name only when it is ours (and, without one, only Services with no such label)."""
    headless = f"!{convert.HEADLESS_LABEL}"
    if resource is not SERVICES:
        return headless
    name = convert.SERVICE_PROXY_NAME_LABEL
    owner = f"{name}={proxy_name}" if proxy_name else f"!{name}"
    return f"{owner},{headless}"


class Sink(Protocol):
    """Where objects go: the ObjectRouter."""

    def upsert(self, obj: Obj, *, origin: str = "") -> bool: ...

    def delete(self, key: ObjectKey) -> None: ...

    def replace_all(
        self, objects: Iterable[tuple[Obj, str]], *, kinds: Iterable[str] | None = None
    ) -> None: ...


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"HTTP {code}: {message}")
        self.code = code


class Gone(Exception):
    """The resourceVersion we watch from is no longer in the server's history."""


@dataclass(frozen=True)
class Timeouts:
    #: Server-side end of each watch request (jittered by up to +50%), as client-go does.
    watch: float = 240.0
    #: No byte for this long on an open watch means the connection is dead (bookmarks and
    #: the server-side timeout guarantee traffic well before it).
    read_margin: float = 30.0
    connect: float = 10.0
    #: A LIST must complete within this.
    request: float = 60.0
    backoff_initial: float = 0.5
    #: Low on purpose: after an outage a node converges within this (client-go's 30 s cap
    #: would leave it serving stale state for half a minute); two requests per node per 5 s
    #: are nothing for an API server.
    backoff_max: float = 5.0


class Backoff:
    """Jittered exponential backoff: 0.5 s, 1 s, 2 s, ... capped, each +-50% random (so a
    fleet of nodes does not hammer a recovering API server in step)."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial, self.cap = initial, cap
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        delay = self._next * random.uniform(0.5, 1.5)
        self._next = min(self._next * 2, self.cap)
        return min(delay, self.cap)


Lister = Callable[..., Awaitable[Any]]


class Reflector:
    def __init__(
        self,
        resource: Resource,
        lister: Lister,
        sink: Sink,
        *,
        selector: str,
        on_change: Callable[[], None],
        timeouts: Timeouts,
    ) -> None:
        self.resource = resource
        self._lister = lister
        self._sink = sink
        self.selector = selector
        self._on_change = on_change
        self.timeouts = timeouts
        self.resource_version: str | None = None
        self.synced = False
        self.relists = 0

    # ------------------------------------------------------------------ requests
    async def _request(self, timeout: aiohttp.ClientTimeout, **params: Any) -> Any:
        response = await self._lister(
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=timeout,
            **params,
        )
        if not 200 <= response.status < 300:
            body = await response.text()
            response.release()
            raise ApiError(response.status, _status_message(body))
        return response

    async def list(self) -> None:
        """LIST everything, make the router's set of this kind equal to it, note the version."""
        t = self.timeouts
        timeout = aiohttp.ClientTimeout(total=t.request, connect=t.connect)
        response = await self._request(timeout)
        try:
            body = json.loads(await response.read())
        finally:
            response.release()
        items = body.get("items") or []
        for item in items:  # list items come without their kind
            item.setdefault("kind", self.resource.kind)
        self._sink.replace_all(((item, "kubernetes") for item in items), kinds=[self.resource.kind])
        self.resource_version = str(body.get("metadata", {}).get("resourceVersion") or "")
        self.synced = True
        self._on_change()
        log.info(
            "Listed objects from the API server.",
            kind=self.resource.kind,
            count=len(items),
            resource_version=self.resource_version,
        )

    async def watch(self) -> int:
        """One WATCH request from the remembered version, until the server ends it.
        Returns how many events arrived."""
        t = self.timeouts
        seconds = int(t.watch * random.uniform(1.0, 1.5))
        timeout = aiohttp.ClientTimeout(
            connect=t.connect, sock_connect=t.connect, sock_read=seconds + t.read_margin
        )
        response = await self._request(
            timeout,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=seconds,
        )
        events = 0
        try:
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._event(json.loads(line))
                        events += 1
        finally:
            response.release()
        return events

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone(obj.get("message", "resource version too old"))
            raise ApiError(int(code or 500), str(obj.get("message", "watch error")))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        if kind == "BOOKMARK":
            return
        obj.setdefault("kind", self.resource.kind)
        if kind in ("ADDED", "MODIFIED"):
            self._sink.upsert(obj, origin="kubernetes")
        elif kind == "DELETED":
            self._sink.delete(object_key(obj))
        else:
            log.warning("Ignoring an unknown watch event.", kind=self.resource.kind, type=kind)
            return
        self._on_change()

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """List when needed, watch, and recover from everything the network and the server
        can do, forever (until cancelled)."""
        backoff = Backoff(self.timeouts.backoff_initial, self.timeouts.backoff_max)
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.resource_version is None:
                    await self.list()
                    self.relists += 1
                started = loop.time()
                events = await self.watch()
                if events or loop.time() - started > 1:
                    backoff.reset()
                    continue
                delay = backoff.next()  # a watch that ends at once, again and again
            except Gone as err:
                log.info(
                    "The watch expired; listing again.", kind=self.resource.kind, reason=str(err)
                )
                self.resource_version = None
                continue
            except ApiError as err:
                if err.code == 410:
                    self.resource_version = None
                    continue
                delay = self._retry_later(
                    "The API server refused a request; retrying.", str(err), backoff
                )
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
                delay = self._retry_later(
                    "Lost the connection to the API server; serving the last known state.",
                    _describe(err),
                    backoff,
                )
            await asyncio.sleep(delay)

    def _retry_later(self, message: str, reason: str, backoff: Backoff) -> float:
        """Log why the loop pauses, and for how long; the seconds to wait."""
        delay = backoff.next()
        log.warning(message, kind=self.resource.kind, reason=reason, retry_in=round(delay, 2))
        return delay


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".rstrip(": ")


def _status_message(body: str) -> str:
    try:
        status = json.loads(body)
        return str(status.get("message") or status.get("reason") or body[:200])
    except ValueError:
        return body[:200] or "no body"


# ----------------------------------------------------------------------------- the source
ZONE_LABEL = "topology.kubernetes.io/zone"


async def node_zone(api: client.ApiClient, node_name: str, timeout: float = 10.0) -> str:
    """This node's zone (its Node's `topology.kubernetes.io/zone` label), for topology-aware
    routing; "" when it cannot be read (no Node of that name, no RBAC to get nodes): zone hints
    are then not used, and everything else works."""
    try:
        read: Lister = client.CoreV1Api(api).read_node
        # The raw response (no model): its status and body are what this needs.
        response = await read(node_name, _preload_content=False, _request_timeout=timeout)
        try:
            if not 200 <= response.status < 300:
                raise ApiError(response.status, _status_message(await response.text()))
            node = json.loads(await response.read())
        finally:
            response.release()
    except (ApiError, aiohttp.ClientError, TimeoutError, ValueError, OSError) as err:
        log.warning("Cannot read this node's zone; topology hints will not be used.",
                    node=node_name, reason=_describe(err))  # fmt: skip
        return ""
    labels = (node.get("metadata") or {}).get("labels") or {}
    zone = labels.get(ZONE_LABEL, "")
    return zone if isinstance(zone, str) else ""


async def api_client(kubeconfig: str | None, master: str | None) -> client.ApiClient:
    """From a kubeconfig (with --master overriding its server), a bare --master URL, or the
    in-cluster service account, as kube-proxy decides."""
    configuration = client.Configuration()
    if kubeconfig:
        if not await asyncio.to_thread(os.path.isfile, kubeconfig):
            # The library would only say the file has no current-context.
            raise OSError(f"{kubeconfig}: no such file")
        await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    elif not master:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    if master:
        configuration.host = master.rstrip("/")
    return client.ApiClient(configuration)


class KubeSource:
    def __init__(
        self,
        api: client.ApiClient,
        sink: Sink,
        *,
        on_change: Callable[[], None],
        proxy_name: str | None = None,
        use_endpoints: bool = False,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.api = api
        self.timeouts = timeouts or Timeouts()
        self.reflectors = [
            Reflector(
                resource,
                getattr(getattr(client, resource.api_class)(api), resource.list_method),
                sink,
                selector=label_selector(resource, proxy_name),
                on_change=on_change,
                timeouts=self.timeouts,
            )
            for resource in watched(use_endpoints)
        ]

    @property
    def server(self) -> str:
        return str(self.api.configuration.host)

    async def initial_list(self) -> None:
        """LIST every resource once (concurrently), retrying until each succeeds: nothing is
        proxied before the whole state is known (a partial state would drop live services)."""
        async with asyncio.TaskGroup() as group:
            for reflector in self.reflectors:
                group.create_task(self._list_until_synced(reflector))

    async def _list_until_synced(self, reflector: Reflector) -> None:
        backoff = Backoff(self.timeouts.backoff_initial, self.timeouts.backoff_max)
        while not reflector.synced:
            try:
                await reflector.list()
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
                delay = backoff.next()
                log.warning(
                    "Cannot list from the API server yet; retrying.",
                    server=self.server,
                    kind=reflector.resource.kind,
                    reason=_describe(err),
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)

    async def watch(self) -> None:
        """Watch every resource until cancelled."""
        async with asyncio.TaskGroup() as group:
            for reflector in self.reflectors:
                group.create_task(reflector.run(), name=f"watch-{reflector.resource.plural}")

    async def close(self) -> None:
        await self.api.close()
