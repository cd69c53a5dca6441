"""A fake Kubernetes API server (aiohttp) speaking the wire protocol an informer relies on.

- One global resourceVersion that only grows, stamped on every object and on list metadata.
- LIST and WATCH, cluster-wide or per namespace, with label selectors (=, ==, !=, exists,
  !exists, in, notin), like the real server.
- WATCH without a resourceVersion (or "0") starts with ADDED for the current state; from a
  version it replays the kept history after it; from a version older than the kept history it
  sends one ERROR event carrying a 410 Status on a 200 stream, as the real apiserver does.
- An object that starts or stops matching a watch's selector arrives as ADDED / DELETED.
- timeoutSeconds ends a stream cleanly; allowWatchBookmarks enables `bookmark()`.

Test hooks, plain Python: apply, delete, compact, expire_watches (410 into open watches),
drop_watches (abort their TCP connections), fail_next (HTTP errors), stop/start on the same
port (or on a socket made inside a network namespace), and a log of the requests served.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

Obj = dict[str, Any]
Resource = tuple[str, str, str]  # group, version, plural
Key = tuple[Resource, str | None, str]

KINDS: dict[Resource, str] = {
    ("", "v1", "services"): "Service",
    ("", "v1", "endpoints"): "Endpoints",
    ("", "v1", "nodes"): "Node",
    ("discovery.k8s.io", "v1", "endpointslices"): "EndpointSlice",
}
NAMESPACED = {"services", "endpoints", "endpointslices"}
PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?/?$"
)
LabelTest = Callable[[dict[str, str]], bool]


def label_selector(text: str) -> list[LabelTest]:
    """The set-based label selector grammar, as predicates over a labels dict."""
    requirements, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            requirements.append(current)
            current = ""
        else:
            current += ch
    requirements.append(current)
    tests: list[LabelTest] = []
    for req in (r.strip() for r in requirements if r.strip()):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", req):
            key, values = m[1], {v.strip() for v in m[3].split(",")}
            negate = m[2] == "notin"
            tests.append(lambda labels, k=key, v=values, n=negate: (labels.get(k) in v) != n)
        elif m := re.fullmatch(r"([^!=\s]+)\s*!=\s*(\S*)", req):
            tests.append(lambda labels, k=m[1], v=m[2]: labels.get(k) != v)
        elif m := re.fullmatch(r"([^!=\s]+)\s*==?\s*(\S*)", req):
            tests.append(lambda labels, k=m[1], v=m[2]: labels.get(k) == v)
        elif m := re.fullmatch(r"!\s*(\S+)", req):
            tests.append(lambda labels, k=m[1]: k not in labels)
        else:
            tests.append(lambda labels, k=req: k in labels)
    return tests


class Query:
    def __init__(self, resource: Resource, namespace: str | None, selector: str) -> None:
        self.resource, self.namespace = resource, namespace
        self.labels = label_selector(selector)

    def match(self, resource: Resource, obj: Obj) -> bool:
        md = obj["metadata"]
        return (
            resource == self.resource
            and (self.namespace is None or md.get("namespace") == self.namespace)
            and all(test(md.get("labels") or {}) for test in self.labels)
        )


def status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class _Watcher:
    def __init__(self, query: Query, transport: Any, bookmarks: bool) -> None:
        self.query, self.transport, self.bookmarks = query, transport, bookmarks
        self.queue: asyncio.Queue[Obj | None] = asyncio.Queue()

    def offer(self, resource: Resource, kind: str, obj: Obj, prev: Obj | None) -> None:
        now = kind != "DELETED" and self.query.match(resource, obj)
        before = prev is not None and self.query.match(resource, prev)
        if kind == "DELETED":
            event = "DELETED" if before else None
        elif now:
            event = "MODIFIED" if before else "ADDED"
        else:
            event = "DELETED" if before else None  # stopped matching the selector
        if event:
            self.queue.put_nowait({"type": event, "object": copy.deepcopy(obj)})


class FakeKube:
    def __init__(self, history: int = 10_000) -> None:
        self.rv = 0
        self.objects: dict[Key, Obj] = {}
        self.log: list[tuple[int, Resource, str, Obj, Obj | None]] = []
        self.history = history
        self.oldest_rv = 0  # history before this version is gone: older watches get 410
        self.watchers: set[_Watcher] = set()
        self.faults: list[list[Any]] = []  # [verb, plural, status, times]
        self.requests: list[tuple[str, str]] = []  # (verb, path and query)
        self._runner: web.AppRunner | None = None
        self.host, self.port = "127.0.0.1", 0

    # ------------------------------------------------------------------ test-side API
    def apply(self, obj: Obj) -> Obj:
        """Create or replace an object; returns the stored copy (with resourceVersion)."""
        obj = copy.deepcopy(obj)
        resource = self._resource_of(obj["kind"])
        md = obj.setdefault("metadata", {})
        if resource[2] in NAMESPACED:
            md.setdefault("namespace", "default")
        key = (resource, md.get("namespace"), md["name"])
        prev = self.objects.get(key)
        self.rv += 1
        md["resourceVersion"] = str(self.rv)
        md.setdefault("uid", prev["metadata"]["uid"] if prev else str(uuid.uuid4()))
        md.setdefault(
            "creationTimestamp",
            datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        self.objects[key] = obj
        self._emit(resource, "MODIFIED" if prev else "ADDED", obj, prev)
        return copy.deepcopy(obj)

    def delete(self, kind: str, name: str, namespace: str | None = "default") -> None:
        resource = self._resource_of(kind)
        prev = self.objects.pop((resource, namespace, name))
        self.rv += 1
        gone = copy.deepcopy(prev)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(resource, "DELETED", gone, prev)

    def compact(self) -> None:
        """Forget all history: a watch from any older version now gets 410 Gone."""
        self.log.clear()
        self.oldest_rv = self.rv

    def expire_watches(self) -> None:
        """Send ERROR 410 into every open watch and end it (compaction, as a watcher sees it)."""
        for w in list(self.watchers):
            w.queue.put_nowait(
                {"type": "ERROR", "object": status(410, "Expired", "too old resource version")}
            )
            w.queue.put_nowait(None)

    def drop_watches(self) -> None:
        """Abort the TCP connections of all open watches (no clean end of the stream)."""
        for w in list(self.watchers):
            if w.transport is not None:
                w.transport.abort()

    def bookmark(self) -> None:
        for w in list(self.watchers):
            if w.bookmarks:
                res = w.query.resource
                w.queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": KINDS[res],
                            "apiVersion": _api_version(res),
                            "metadata": {"resourceVersion": str(self.rv)},
                        },
                    }
                )

    def fail_next(
        self, verb: str = "*", plural: str = "*", status_code: int = 503, times: int = 1
    ) -> None:
        """Answer the next `times` requests (verb: list, watch, get, ... or *) with an error."""
        self.faults.append([verb, plural, status_code, times])

    def count(self, verb: str, plural: str) -> int:
        return sum(1 for v, path in self.requests if v == verb and f"/{plural}" in path)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "s3cret-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path

    async def start(
        self, host: str = "127.0.0.1", port: int | None = None, sock: socket.socket | None = None
    ) -> FakeKube:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:  # e.g. a listening socket made inside a network namespace
            site = web.SockSite(self._runner, sock)
            self.host, self.port = sock.getsockname()[:2]
            await site.start()
        else:
            site = web.TCPSite(
                self._runner, host, self.port if port is None else port, reuse_address=True
            )
            await site.start()
            server = site._server
            assert server is not None
            self.host, self.port = host, server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeKube:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _resource_of(kind: str) -> Resource:
        for resource, k in KINDS.items():
            if k == kind:
                return resource
        raise KeyError(kind)

    def _emit(self, resource: Resource, kind: str, obj: Obj, prev: Obj | None) -> None:
        self.log.append((self.rv, resource, kind, obj, prev))
        if len(self.log) > self.history:
            self.oldest_rv = self.log.pop(0)[0]
        for w in list(self.watchers):
            w.offer(resource, kind, obj, prev)

    def _fault(self, verb: str, plural: str) -> int | None:
        for fault in self.faults:
            if fault[0] in ("*", verb) and fault[1] in ("*", plural) and fault[3] > 0:
                fault[3] -= 1
                return int(fault[2])
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake"})
        m = PATH.match(request.path)
        resource = (m["group"] or "", m["core"] or m["version"], m["plural"]) if m else None
        if m is None or resource not in KINDS:
            return web.json_response(status(404, "NotFound", request.path), status=404)
        assert resource is not None
        query = request.query
        watch = query.get("watch", "").lower() in ("true", "1")
        if request.method != "GET":
            return web.json_response(status(405, "MethodNotAllowed", "read-only"), status=405)
        verb = "watch" if watch else ("get" if m["name"] else "list")
        self.requests.append((verb, request.path_qs))
        if code := self._fault(verb, resource[2]):
            return web.json_response(status(code, "Injected", f"injected {code}"), status=code)
        selector = Query(resource, m["ns"], query.get("labelSelector", ""))
        if verb == "watch":
            return await self._watch(request, selector)
        if verb == "get":
            obj = self.objects.get((resource, m["ns"], m["name"]))
            if obj is None:
                return web.json_response(status(404, "NotFound", m["name"]), status=404)
            return web.json_response(obj)
        items = [  # a real LIST leaves kind and apiVersion off its items
            {k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
            for (r, _, _), o in self.objects.items()
            if selector.match(r, o)
        ]  # shallow copies: serialised below, before any later change can touch them
        return web.json_response(
            {
                "kind": KINDS[resource] + "List",
                "apiVersion": _api_version(resource),
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(self, request: web.Request, query: Query) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        q = request.query
        watcher = _Watcher(
            query, request.transport, q.get("allowWatchBookmarks", "").lower() in ("true", "1")
        )
        rv = q.get("resourceVersion", "")
        if rv not in ("", "0") and int(rv) < self.oldest_rv:
            gone = status(410, "Expired", f"too old resource version: {rv} ({self.oldest_rv})")
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return response
        if rv in ("", "0"):
            for (r, _, _), o in list(self.objects.items()):
                if query.match(r, o):
                    watcher.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(o)})
        else:
            for erv, r, kind, obj, prev in self.log:
                if erv > int(rv):
                    watcher.offer(r, kind, obj, prev)
        self.watchers.add(watcher)  # right after the snapshot, in the same step: no gap
        timeout = float(q["timeoutSeconds"]) if "timeoutSeconds" in q else None
        try:
            async with asyncio.timeout(timeout):
                while (event := await watcher.queue.get()) is not None:
                    await response.write(json.dumps(event).encode() + b"\n")
        except (TimeoutError, ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.discard(watcher)
        return response


def _api_version(resource: Resource) -> str:
    return f"{resource[0]}/{resource[1]}" if resource[0] else resource[1]
