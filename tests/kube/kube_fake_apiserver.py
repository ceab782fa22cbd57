"""A fake Kubernetes API server over real HTTP, speaking the wire protocol the official client uses.

It serves Deployments (apps/v1) and Services (v1): paged lists with resourceVersion and continue
tokens, label selectors, chunked watch streams of JSON lines (ADDED/MODIFIED/DELETED, BOOKMARK,
in-stream ERROR 410 for a compacted version, selector transitions turned into ADDED/DELETED as
the real watch cache does), ``timeoutSeconds``, and DELETE with uid preconditions. Tests change
its state (``apply``, ``delete``) and script the next requests of a collection (HTTP errors with
Retry-After, a stream of canned events followed by a clean close, a 410, an abrupt close mid-line
or silence) and of DELETEs (HTTP errors with Retry-After). It is not a real API server: it is
faithful on the wire where the client looks, and has no admission, field selectors, set-based
selectors, server-side apply or authentication.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import itertools
import json
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

from aiohttp import web

Kind = Literal["deployments", "services"]
Then = Literal["live", "close", "gone", "abrupt", "silence"]

_LIST_KINDS: dict[str, tuple[str, str, str]] = {
    # collection → (List kind, object kind, apiVersion)
    "deployments": ("DeploymentList", "Deployment", "apps/v1"),
    "services": ("ServiceList", "Service", "v1"),
}


@dataclasses.dataclass(frozen=True)
class WatchScript:
    """What the next watch request of a collection gets, instead of the live stream."""

    events: Sequence[Mapping[str, Any] | bytes] = ()
    """Sent first, as they are (dicts are JSON-encoded, bytes are written raw)."""
    then: Then = "live"
    """After the events: carry on live, close cleanly, send ERROR 410, cut mid-line, or go silent."""
    status: int | None = None
    """Answer with this HTTP status (and a Status body) instead of a stream."""
    retry_after: int | str | None = None
    """The ``Retry-After`` header sent with ``status``: seconds, or any text (an HTTP-date)."""


@dataclasses.dataclass(frozen=True)
class ListScript:
    """What the next list request of a collection (or the next DELETE) gets, instead of the objects."""

    status: int
    retry_after: int | str | None = None
    """The ``Retry-After`` header: seconds, or any text (an HTTP-date)."""


@dataclasses.dataclass(frozen=True)
class Recorded:
    method: str
    collection: str
    namespace: str | None
    query: Mapping[str, str]
    body: Any = None
    at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


_REASONS = {
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def _selector_matches(selector: str | None, labels: Mapping[str, str]) -> bool:
    """The equality- and existence-based label selector syntax (``a``, ``!a``, ``a=b``, ``a!=b``)."""
    if not selector:
        return True
    for requirement in (r.strip() for r in selector.split(",")):
        if not requirement:
            continue
        if "!=" in requirement:
            key, value = requirement.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in requirement:
            key, value = requirement.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif requirement.startswith("!"):
            if requirement[1:].strip() in labels:
                return False
        elif requirement not in labels:
            return False
    return True


def _labels(obj: Mapping[str, Any] | None) -> Mapping[str, str]:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


@dataclasses.dataclass
class _Event:
    rv: int
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


class _Watch:
    def __init__(self, collection: str, namespace: str | None, selector: str | None) -> None:
        self.collection = collection
        self.namespace = namespace
        self.selector = selector
        self.queue: asyncio.Queue[_Event | None] = asyncio.Queue()
        self.request: web.Request | None = None


class FakeApiServer:
    """State, history and scripts of the fake; ``start()`` binds it to a loopback port."""

    def __init__(self) -> None:
        self.rv = 1000
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {"deployments": {}, "services": {}}
        self.history: dict[str, list[_Event]] = {"deployments": [], "services": []}
        self.compacted: dict[str, int] = {"deployments": 0, "services": 0}
        self.requests: list[Recorded] = []
        self.watch_scripts: dict[str, deque[WatchScript]] = {"deployments": deque(), "services": deque()}
        self.list_scripts: dict[str, deque[ListScript]] = {"deployments": deque(), "services": deque()}
        self.delete_scripts: deque[ListScript] = deque()
        self._watches: set[_Watch] = set()
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        self._tokens = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        for collection, prefix in (("deployments", "/apis/apps/v1"), ("services", "/api/v1")):
            app.router.add_get(f"{prefix}/{collection}", self._handler(collection))
            app.router.add_get(f"{prefix}/namespaces/{{namespace}}/{collection}", self._handler(collection))
            app.router.add_delete(f"{prefix}/namespaces/{{namespace}}/{collection}/{{name}}", self._delete_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    # --- state changes made by tests -----------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def apply(self, obj: Mapping[str, Any], *, notify: bool = True) -> dict[str, Any]:
        """Create or replace an object, as ``kubectl apply`` would; returns the stored copy.

        ``notify=False`` changes state without any watch seeing it, and compacts history past
        it, as if the event happened while the client was disconnected and is gone from etcd.
        """
        stored = copy.deepcopy(dict(obj))
        collection = "deployments" if stored["kind"] == "Deployment" else "services"
        meta = stored.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        old = self.objects[collection].get(key)
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        else:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", "2024-05-01T10:00:00Z")
        meta["resourceVersion"] = str(self._next_rv())
        self.objects[collection][key] = stored
        self._record(collection, _Event(self.rv, "MODIFIED" if old else "ADDED", stored, old), notify)
        return stored

    def delete(self, collection: Kind, namespace: str, name: str, *, notify: bool = True) -> None:
        old = self.objects[collection].pop((namespace, name))
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._record(collection, _Event(self.rv, "DELETED", gone, old), notify)

    def _record(self, collection: str, event: _Event, notify: bool) -> None:
        if not notify:
            self.compacted[collection] = self.rv
            return
        self.history[collection].append(event)
        for watch in list(self._watches):
            if watch.collection == collection:
                watch.queue.put_nowait(event)

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resourceVersion to every open live watch."""
        for watch in list(self._watches):
            watch.queue.put_nowait(_Event(self.rv, "BOOKMARK", {}, None))

    def expire_watches(self) -> None:
        """End every open live watch with an in-stream ERROR 410, as after an etcd compaction."""
        self.compact()
        for watch in list(self._watches):
            watch.queue.put_nowait(_Event(self.rv, "EXPIRE", {}, None))

    def compact(self) -> None:
        for collection in self.compacted:
            self.compacted[collection] = self.rv

    def drop_watches(self) -> None:
        """Cut every open watch connection without a terminating chunk (a network failure)."""
        for watch in list(self._watches):
            if watch.request is not None and watch.request.transport is not None:
                watch.request.transport.abort()

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def lists(self, collection: str = "deployments") -> list[Recorded]:
        return [r for r in self.requests if r.collection == collection and r.method == "GET" and not r.watch]

    def watches(self, collection: str = "deployments") -> list[Recorded]:
        return [r for r in self.requests if r.collection == collection and r.watch]

    # --- HTTP ----------------------------------------------------------------------------------

    def _handler(self, collection: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            namespace = request.match_info.get("namespace")
            query = dict(request.query)
            self.requests.append(Recorded("GET", collection, namespace, query))
            if query.get("watch") in ("true", "1"):
                return await self._watch(request, collection, namespace, query)
            return self._list(collection, namespace, query)

        return handle

    def _error(self, code: int, message: str, retry_after: int | str | None = None) -> web.Response:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        body = status_object(code, _REASONS.get(code, "Unknown"), message)
        return web.json_response(body, status=code, headers=headers)

    def _visible(self, collection: str, namespace: str | None, selector: str | None) -> list[dict[str, Any]]:
        return [
            obj
            for (ns, _), obj in sorted(self.objects[collection].items())
            if (namespace is None or ns == namespace) and _selector_matches(selector, _labels(obj))
        ]

    def _list(self, collection: str, namespace: str | None, query: Mapping[str, str]) -> web.Response:
        scripts = self.list_scripts[collection]
        if scripts:
            script = scripts.popleft()
            return self._error(script.status, "scripted list failure", script.retry_after)
        list_kind, _, api_version = _LIST_KINDS[collection]
        token = query.get("continue")
        if token:
            decoded = json.loads(base64.b64decode(token))
            if decoded["rv"] < self.compacted[collection] or decoded["id"] not in self._snapshots:
                return self._error(410, "The provided continue parameter is too old")
            items, offset, rv = self._snapshots[decoded["id"]], decoded["offset"], decoded["rv"]
        else:
            items, offset, rv = self._visible(collection, namespace, query.get("labelSelector")), 0, self.rv
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[offset : offset + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if offset + limit < len(items):
            snapshot_id = f"{collection}-{next(self._tokens)}"
            self._snapshots[snapshot_id] = items
            raw = json.dumps({"id": snapshot_id, "rv": rv, "offset": offset + limit}).encode()
            metadata["continue"] = base64.b64encode(raw).decode()
        # Items of a list carry no kind/apiVersion on the real API server either.
        body = [{k: v for k, v in obj.items() if k not in ("kind", "apiVersion")} for obj in page]
        return web.json_response({"kind": list_kind, "apiVersion": api_version, "metadata": metadata, "items": body})

    async def _watch(
        self, request: web.Request, collection: str, namespace: str | None, query: Mapping[str, str]
    ) -> web.StreamResponse:
        scripts = self.watch_scripts[collection]
        script = scripts.popleft() if scripts else WatchScript()
        if script.status is not None:
            return self._error(script.status, "scripted watch failure", script.retry_after)
        selector = query.get("labelSelector")
        since = int(query.get("resourceVersion") or 0)
        watch = _Watch(collection, namespace, selector)
        watch.request = request
        # Registering and snapshotting history in one step: no event can fall between them.
        backlog = [e for e in self.history[collection] if e.rv > since]
        self._watches.add(watch)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if since and since < self.compacted[collection]:
                message = f"too old resource version: {since} ({self.compacted[collection]})"
                await self._write(response, {"type": "ERROR", "object": status_object(410, "Expired", message)})
                return response
            for event in backlog:
                await self._send(response, watch, event)
            for raw in script.events:
                if isinstance(raw, bytes):
                    await response.write(raw)
                else:
                    await self._write(response, raw)
            if script.then == "close":
                return response
            if script.then == "gone":
                status = status_object(410, "Expired", "too old resource version")
                await self._write(response, {"type": "ERROR", "object": status})
                return response
            if script.then == "abrupt":
                await response.write(b'{"type":"MODIFIED","object":{"kind":"Deploy')
                assert request.transport is not None
                request.transport.abort()
                return response
            deadline = asyncio.get_running_loop().time() + float(query.get("timeoutSeconds") or 3600)
            while asyncio.get_running_loop().time() < deadline:
                if request.transport is None or request.transport.is_closing():
                    return response  # The client gave up (read timeout) or we cut it.
                try:
                    event = await asyncio.wait_for(watch.queue.get(), 0.05)
                except TimeoutError:
                    continue
                if event is None:
                    return response
                if event.type == "EXPIRE":
                    message = f"too old resource version: {since} ({self.compacted[collection]})"
                    await self._write(response, {"type": "ERROR", "object": status_object(410, "Expired", message)})
                    return response
                if script.then != "silence":
                    await self._send(response, watch, event)
            return response
        except (ConnectionResetError, ConnectionError):
            return response
        finally:
            self._watches.discard(watch)

    async def _write(self, response: web.StreamResponse, event: Mapping[str, Any]) -> None:
        await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    async def _send(self, response: web.StreamResponse, watch: _Watch, event: _Event) -> None:
        _, kind, api_version = _LIST_KINDS[watch.collection]
        if event.type == "BOOKMARK":
            meta = {"resourceVersion": str(event.rv)}
            await self._write(
                response, {"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": meta}}
            )
            return
        ns = event.obj["metadata"]["namespace"]
        if watch.namespace is not None and ns != watch.namespace:
            return
        now = _selector_matches(watch.selector, _labels(event.obj))
        before = event.old is not None and _selector_matches(watch.selector, _labels(event.old))
        event_type = event.type
        if event_type == "MODIFIED" and now != before:
            # The watch cache turns selector transitions into ADDED / DELETED for the watcher.
            event_type = "ADDED" if now else "DELETED"
        elif event_type == "DELETED":
            if not before:
                return
        elif not now:
            return
        obj = {"kind": kind, "apiVersion": api_version, **event.obj}
        await self._write(response, {"type": event_type, "object": obj})

    async def _delete_handler(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        collection: Kind = "deployments" if "/apps/" in request.path else "services"
        body = await request.json() if request.can_read_body else {}
        self.requests.append(Recorded("DELETE", collection, namespace, {"name": name}, body))
        if self.delete_scripts:
            script = self.delete_scripts.popleft()
            return self._error(script.status, "scripted delete failure", script.retry_after)
        current = self.objects[collection].get((namespace, name))
        if current is None:
            return self._error(404, f'{collection} "{name}" not found')
        uid = ((body or {}).get("preconditions") or {}).get("uid")
        if uid is not None and uid != current["metadata"]["uid"]:
            return self._error(409, f"Precondition failed: UID in precondition: {uid}, UID in object meta: ...")
        self.delete(collection, namespace, name)
        return web.json_response({**status_object(200, "", ""), "status": "Success", "details": {"name": name}})

    def deletes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "DELETE"]


# --- object builders used by the tests ------------------------------------------------------------


def deployment(
    name: str,
    *,
    service: str,
    key: str | None = None,
    namespace: str = "shop",
    ready: int = 1,
    upstream: str | None = None,
    annotations: Mapping[str, str] | None = None,
    pod_labels: Mapping[str, str] | None = None,
    port: int = 8080,
    created: str | None = None,
) -> dict[str, Any]:
    """A complete apps/v1 Deployment labelled per the devstack contract."""
    labels = {"app": name, "devstack.io/service": service}
    if key is not None:
        labels["devstack.io/routing-key"] = key
    notes = dict(annotations or {})
    if upstream is not None:
        notes["devstack.io/upstream"] = upstream
    template_labels = dict(pod_labels or {"app": name})
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels, "annotations": notes}
    if created is not None:
        metadata["creationTimestamp"] = created
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": template_labels},
            "template": {
                "metadata": {"labels": template_labels},
                "spec": {
                    "containers": [{"name": "app", "image": f"{service}:dev", "ports": [{"containerPort": port}]}]
                },
            },
        },
        "status": {"replicas": 1, "readyReplicas": ready} if ready else {"replicas": 1},
    }


def service_object(name: str, *, namespace: str = "shop", selector: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": dict(selector), "ports": [{"port": 80, "targetPort": 8080}]},
    }


def watch_event(event_type: str, obj: Mapping[str, Any], rv: int) -> dict[str, Any]:
    """A raw watch event line for scripted streams, with an explicit resourceVersion."""
    stamped = copy.deepcopy(dict(obj))
    stamped["metadata"]["resourceVersion"] = str(rv)
    stamped["metadata"].setdefault("uid", f"uid-{stamped['metadata']['name']}")
    stamped["metadata"].setdefault("creationTimestamp", "2024-05-01T10:00:00Z")
    return {"type": event_type, "object": stamped}


def apply_all(server: FakeApiServer, objects: Iterable[Mapping[str, Any]]) -> None:
    for obj in objects:
        server.apply(obj)


# --- faults of the API server as a whole (tests/kube/test_kube_faults.py) -------------------------

Fault = Literal["500", "429", "close"]


class FaultyApiServer(FakeApiServer):
    """The fake, optionally on a socket bound in advance, and able to fail every list and watch request.

    A socket bound in advance (``reserve_port``) is a port where connections are refused and that
    no other process can take, until ``start`` listens on it: the API server appears where a
    client has been pointing all along (a controller started before its API server). While
    ``fault`` is set, it is asked once per list or watch request and its answer replaces the
    normal one: ``"500"`` or ``"429"`` (with ``Retry-After: retry_after``) or ``"close"`` (the
    connection is cut before any response byte). ``faults`` records what each request got, and when.
    """

    def __init__(self, sock: socket.socket | None = None, *, retry_after: int = 1) -> None:
        super().__init__()
        self.sock = sock
        """Owned from here on: listened on by ``start``, closed by ``close`` (started or not)."""
        self.port = sock.getsockname()[1] if sock is not None else 0
        self.url = f"http://127.0.0.1:{self.port}" if sock is not None else ""
        self.retry_after = retry_after
        self.fault: Callable[[], Fault | None] | None = None
        self.faults: list[tuple[float, Fault]] = []

    async def start(self) -> None:
        app = web.Application()
        for collection, prefix in (("deployments", "/apis/apps/v1"), ("services", "/api/v1")):
            app.router.add_get(f"{prefix}/{collection}", self._handler(collection))
            app.router.add_get(f"{prefix}/namespaces/{{namespace}}/{collection}", self._handler(collection))
            app.router.add_delete(f"{prefix}/namespaces/{{namespace}}/{collection}/{{name}}", self._delete_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site: web.BaseSite
        if self.sock is not None:
            site = web.SockSite(self._runner, self.sock)
        else:
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        await super().close()
        if self.sock is not None:
            self.sock.close()  # Idempotent; what releases the port if the server never started.

    def _handler(self, collection: str) -> Any:
        healthy = super()._handler(collection)

        async def handle(request: web.Request) -> web.StreamResponse:
            fault = self.fault() if self.fault is not None else None
            if fault is None:
                return cast(web.StreamResponse, await healthy(request))
            self.requests.append(Recorded("GET", collection, request.match_info.get("namespace"), dict(request.query)))
            self.faults.append((time.monotonic(), fault))
            if fault == "close":
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)  # Never sent: the connection is already gone.
            return self._error(int(fault), f"scripted {fault}", self.retry_after)

        return handle


def reserve_port() -> socket.socket:
    """A loopback socket bound to a free port but not listening: connecting to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock
