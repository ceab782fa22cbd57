"""A fake Kubernetes API server over real HTTP, speaking the wire protocol the official client uses.

It serves Deployments (apps/v1), Services (v1) and ConfigMaps (v1): paged lists with
resourceVersion and continue tokens, label selectors, chunked watch streams of JSON lines
(ADDED/MODIFIED/DELETED, BOOKMARK, in-stream ERROR 410 for a compacted version, selector
transitions turned into ADDED/DELETED as the real watch cache does), ``timeoutSeconds``, and
DELETE with uid preconditions. Tests change its state (``apply``, ``delete``, ``set_ready``) and
script the next requests of a collection (HTTP errors with Retry-After, a stream of canned events
followed by a clean close, a 410, an abrupt close mid-line or silence) and of DELETEs (HTTP errors
with Retry-After).

The writes ``devstack fork/rm/extend/group`` make are served too, approximately (see ``_apply`` and
``_merge``): ``GET`` of one object by name; server-side apply (``PATCH`` with
``application/apply-patch+yaml`` and ``fieldManager``, ``force``), with per-manager field
ownership in ``metadata.managedFields``, 409 conflicts with other managers' differing values,
fields a manager stops applying removed, Deployment selector checks (must match the template,
immutable) and ``generation``; JSON merge patch (``application/merge-patch+json``) with the
``resourceVersion`` precondition; DELETE cascading to dependents by ``ownerReferences``
(immediately, where the real garbage collector takes a moment); and RBAC refusals (``forbid``)
answered 403 with the API server's wording. Lists are atomic in its apply (the real one merges
``containers``, ``ports`` and ``env`` by key), ``status`` is not a subresource the client can
write, and it has no admission, defaulting, field selectors, set-based selectors or
authentication: faithful on the wire where the client looks, not a real API server.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import datetime as dt
import itertools
import json
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import yaml
from aiohttp import web

Kind = Literal["deployments", "services", "configmaps"]
Then = Literal["live", "close", "gone", "abrupt", "silence"]

_LIST_KINDS: dict[str, tuple[str, str, str]] = {
    # collection → (List kind, object kind, apiVersion)
    "deployments": ("DeploymentList", "Deployment", "apps/v1"),
    "services": ("ServiceList", "Service", "v1"),
    "configmaps": ("ConfigMapList", "ConfigMap", "v1"),
}
_GROUPS: dict[str, str] = {"deployments": "apps", "services": "", "configmaps": ""}
_COLLECTION_OF_KIND: dict[str, Kind] = {"Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps"}
_PREFIXES: dict[str, str] = {"deployments": "/apis/apps/v1", "services": "/api/v1", "configmaps": "/api/v1"}
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"


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
    name: str | None = None
    """The object a GET, PATCH or DELETE named; None for a list or watch of the collection."""
    content_type: str = ""

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
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    415: "UnsupportedMediaType",
    422: "Invalid",
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
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {c: {} for c in _LIST_KINDS}
        self.history: dict[str, list[_Event]] = {c: [] for c in _LIST_KINDS}
        self.compacted: dict[str, int] = dict.fromkeys(_LIST_KINDS, 0)
        self.requests: list[Recorded] = []
        self.watch_scripts: dict[str, deque[WatchScript]] = {c: deque() for c in _LIST_KINDS}
        self.list_scripts: dict[str, deque[ListScript]] = {c: deque() for c in _LIST_KINDS}
        self.delete_scripts: deque[ListScript] = deque()
        self.forbidden: set[tuple[str, str, str | None]] = set()
        """(verb, collection, namespace) that RBAC refuses: see ``forbid``."""
        self.user = "alice@example.com"
        """Who the 403 messages name, as the API server names the authenticated user."""
        self._watches: set[_Watch] = set()
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        self._tokens = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        for collection, prefix in _PREFIXES.items():
            app.router.add_get(f"{prefix}/{collection}", self._handler(collection))
            app.router.add_get(f"{prefix}/namespaces/{{namespace}}/{collection}", self._handler(collection))
            one = f"{prefix}/namespaces/{{namespace}}/{collection}/{{name}}"
            app.router.add_get(one, self._get_handler)
            app.router.add_patch(one, self._patch_handler)
            app.router.add_delete(one, self._delete_handler)

    async def start(self) -> None:
        app = web.Application()
        self._add_routes(app)
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

    def apply(self, obj: Mapping[str, Any], *, notify: bool = True, manager: str | None = None) -> dict[str, Any]:
        """Create or replace an object, as ``kubectl apply`` would; returns the stored copy.

        ``notify=False`` changes state without any watch seeing it, and compacts history past
        it, as if the event happened while the client was disconnected and is gone from etcd.
        ``manager`` records it as that field manager's update (``kubectl edit``, ``set image``):
        it then owns every field the object sets, for server-side apply's conflicts.
        """
        stored = copy.deepcopy(dict(obj))
        if manager is not None:
            owned = _leaf_paths({k: v for k, v in stored.items() if k not in ("apiVersion", "kind", "status")})
            stored.setdefault("metadata", {})["managedFields"] = [
                _managed_entry(manager, "Update", owned, stored.get("apiVersion", ""))
            ]
        collection = _COLLECTION_OF_KIND[stored["kind"]]
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
        return [
            r
            for r in self.requests
            if r.collection == collection and r.method == "GET" and not r.watch and r.name is None
        ]

    def watches(self, collection: str = "deployments") -> list[Recorded]:
        return [r for r in self.requests if r.collection == collection and r.watch]

    # --- HTTP ----------------------------------------------------------------------------------

    def _handler(self, collection: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            namespace = request.match_info.get("namespace")
            query = dict(request.query)
            self.requests.append(Recorded("GET", collection, namespace, query))
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
            if (refused := self._refusal(verb, collection, namespace, None)) is not None:
                return refused
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
        collection = _collection_of(request)
        body = await request.json() if request.can_read_body else {}
        self.requests.append(Recorded("DELETE", collection, namespace, {"name": name}, body, name=name))
        if (refused := self._refusal("delete", collection, namespace, name)) is not None:
            return refused
        if self.delete_scripts:
            script = self.delete_scripts.popleft()
            return self._error(script.status, "scripted delete failure", script.retry_after)
        current = self.objects[collection].get((namespace, name))
        if current is None:
            return self._error(404, f'{_resource(collection)} "{name}" not found')
        uid = ((body or {}).get("preconditions") or {}).get("uid")
        if uid is not None and uid != current["metadata"]["uid"]:
            return self._error(409, f"Precondition failed: UID in precondition: {uid}, UID in object meta: ...")
        self.delete(collection, namespace, name)
        if (body or {}).get("propagationPolicy") != "Orphan":
            self._collect_garbage(current["metadata"]["uid"])
        return web.json_response({**status_object(200, "", ""), "status": "Success", "details": {"name": name}})

    def _collect_garbage(self, owner_uid: str) -> None:
        """Delete every object an ``ownerReferences`` entry ties to ``owner_uid``, and theirs in turn.

        The real garbage collector does this asynchronously after the owner is gone (background
        propagation); here it happens before the DELETE is answered.
        """
        for collection, objects in self.objects.items():
            for (namespace, name), obj in list(objects.items()):
                owners = obj["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in owners) and (namespace, name) in objects:
                    self.delete(cast(Kind, collection), namespace, name)
                    self._collect_garbage(obj["metadata"]["uid"])

    def deletes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "DELETE"]

    def patches(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]

    # --- RBAC -------------------------------------------------------------------------------------

    def forbid(self, verb: str, collection: Kind, namespace: str | None = None) -> None:
        """RBAC refuses ``verb`` (get, list, watch, patch, delete) on ``collection``: in ``namespace``;
        with ``"*"`` only across all namespaces (a user whose Roles are namespaced); with None everywhere."""
        self.forbidden.add((verb, collection, namespace))

    def _refusal(self, verb: str, collection: str, namespace: str | None, name: str | None) -> web.Response | None:
        scopes = {None, namespace} if namespace is not None else {None, "*"}
        if not any((verb, collection, scope) in self.forbidden for scope in scopes):
            return None
        group = _GROUPS[collection]
        subject = f'{_resource(collection)} "{name}"' if name else _resource(collection)
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        message = (
            f'{subject} is forbidden: User "{self.user}" cannot {verb} resource "{collection}" '
            f'in API group "{group}" {scope}'
        )
        return self._error(403, message)

    # --- one object: GET, server-side apply, merge patch ---------------------------------------------

    async def _get_handler(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        collection = _collection_of(request)
        self.requests.append(Recorded("GET", collection, namespace, dict(request.query), name=name))
        if (refused := self._refusal("get", collection, namespace, name)) is not None:
            return refused
        current = self.objects[collection].get((namespace, name))
        if current is None:
            return self._error(404, f'{_resource(collection)} "{name}" not found')
        return web.json_response(self._with_kind(collection, current))

    def _with_kind(self, collection: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        _, kind, api_version = _LIST_KINDS[collection]
        return {"kind": kind, "apiVersion": api_version, **copy.deepcopy(dict(obj))}

    async def _patch_handler(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        collection = _collection_of(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        query = dict(request.query)
        raw = await request.read()
        try:
            body = yaml.safe_load(raw.decode()) if content_type == APPLY_PATCH else json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            body = None
            problem: str | None = f"the body of the request was in an unknown format: {exc}"
        else:
            problem = None if isinstance(body, dict) else "the body is not an object"
        self.requests.append(
            Recorded("PATCH", collection, namespace, query, body, name=name, content_type=content_type)
        )
        if (refused := self._refusal("patch", collection, namespace, name)) is not None:
            return refused
        if content_type not in (APPLY_PATCH, MERGE_PATCH):
            supported = f"{APPLY_PATCH}, {MERGE_PATCH}"
            return self._error(415, f"the fake supports only {supported}; got {content_type!r}")
        if problem is not None:
            return self._error(400, problem)
        try:
            if content_type == APPLY_PATCH:
                status, stored = self._apply(collection, namespace, name, body, query)
            else:
                status, stored = self._merge(collection, namespace, name, body, query)
        except _Refused as exc:
            return self._error(exc.code, exc.message)
        return web.json_response(self._with_kind(collection, stored), status=status)

    def _apply(
        self, collection: Kind, namespace: str, name: str, config: dict[str, Any], query: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """Server-side apply of ``config`` by ``fieldManager``, approximated (see the module docstring).

        Ownership is per leaf field, lists counting as one field. A manager's applied fields are
        merged into the object; a field another manager owns with a different value is a conflict
        (409) unless ``force``, which moves it to this manager; a field this manager applied
        before and no longer applies, and nobody else owns, is removed.
        """
        manager = query.get("fieldManager")
        if not manager:
            raise _Refused(400, "PATCH requests must specify fieldManager for apply requests (application/apply-patch)")
        force = query.get("force") == "true"
        _, kind, api_version = _LIST_KINDS[collection]
        if config.get("apiVersion") != api_version or config.get("kind") != kind:
            raise _Refused(400, f"apply of {kind} {api_version} needs apiVersion {api_version} and kind {kind}")
        meta = config.get("metadata") or {}
        if meta.get("name") != name:
            raise _Refused(
                400, f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        if meta.get("namespace", namespace) != namespace:
            raise _Refused(400, "the namespace of the provided object does not match the namespace sent on the request")
        applied = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("apiVersion", "kind", "status")}
        applied["metadata"] = {k: v for k, v in applied.get("metadata", {}).items() if k not in _SERVER_OWNED_META}
        current = self.objects[collection].get((namespace, name))
        live = copy.deepcopy(current) if current is not None else {"metadata": {"name": name, "namespace": namespace}}
        entries: list[dict[str, Any]] = live["metadata"].pop("managedFields", None) or []
        mine = _leaf_paths(applied)
        others = [e for e in entries if not (e["manager"] == manager and e["operation"] == "Apply")]
        before = next((e for e in entries if e["manager"] == manager and e["operation"] == "Apply"), None)
        conflicts: list[tuple[str, tuple[str, ...]]] = []
        for entry in others:
            for path in _paths_of(entry) & mine:
                if _get_path(live, path) != _get_path(applied, path):
                    conflicts.append((entry["manager"], path))
        if conflicts and not force:
            listed = "; ".join(f'conflict with "{who}": .{".".join(path)}' for who, path in conflicts)
            raise _Refused(409, f"Apply failed with {len(conflicts)} conflict(s): {listed}")
        taken = {path for _, path in conflicts}
        for entry in others:
            entry["fieldsV1"] = _fields_v1(_paths_of(entry) - taken)
        others = [e for e in others if _paths_of(e)]
        still_owned = set().union(*(_paths_of(e) for e in others)) if others else set()
        for path in (_paths_of(before) if before else set()) - mine - still_owned:
            _delete_path(live, path)
        _merge_into(live, applied)
        self._check_deployment(collection, current, live)
        managed = [*others, _managed_entry(manager, "Apply", mine, api_version)]
        return self._store(collection, namespace, name, current, live, managed)

    def _merge(
        self, collection: Kind, namespace: str, name: str, patch: dict[str, Any], query: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """RFC 7386 JSON merge patch; ``metadata.resourceVersion`` in it is a precondition."""
        current = self.objects[collection].get((namespace, name))
        if current is None:
            raise _Refused(404, f'{_resource(collection)} "{name}" not found')
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise _Refused(
                409,
                f'Operation cannot be fulfilled on {_resource(collection)} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )
        live = copy.deepcopy(current)
        entries: list[dict[str, Any]] = live["metadata"].pop("managedFields", None) or []
        changes = copy.deepcopy(patch)
        changes.get("metadata", {}).pop("resourceVersion", None)
        _merge_patch(live, changes)
        self._check_deployment(collection, current, live)
        manager = query.get("fieldManager") or "unknown"
        touched = _leaf_paths(changes)
        for entry in entries:
            entry["fieldsV1"] = _fields_v1(_paths_of(entry) - touched)
        entries = [e for e in entries if _paths_of(e) and not (e["manager"] == manager and e["operation"] == "Update")]
        previous = next((e for e in current["metadata"].get("managedFields") or [] if e["manager"] == manager), None)
        owned = (_paths_of(previous) if previous and previous["operation"] == "Update" else set()) | touched
        api_version = _LIST_KINDS[collection][2]
        entries.append(_managed_entry(manager, "Update", {p for p in owned if _has_path(live, p)}, api_version))
        return self._store(collection, namespace, name, current, live, entries)

    def _check_deployment(self, collection: str, current: Mapping[str, Any] | None, live: Mapping[str, Any]) -> None:
        """The two validations of a Deployment that a fork can get wrong: selector vs template, immutability."""
        if collection != "deployments":
            return
        selector = ((live.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        labels = (((live.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            raise _Refused(
                422, "spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`"
            )
        if current is not None and (current.get("spec") or {}).get("selector") != (live.get("spec") or {}).get(
            "selector"
        ):
            raise _Refused(422, "spec.selector: Invalid value: field is immutable")

    def _store(
        self,
        collection: Kind,
        namespace: str,
        name: str,
        current: dict[str, Any] | None,
        live: dict[str, Any],
        managed: list[dict[str, Any]],
    ) -> tuple[int, dict[str, Any]]:
        meta = live["metadata"]
        if current is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if collection == "deployments":
                meta["generation"] = 1
        elif collection == "deployments" and (current.get("spec") != live.get("spec")):
            meta["generation"] = int(current["metadata"].get("generation") or 1) + 1
        unchanged = current is not None and {**current, "metadata": _without_managed(current["metadata"])} == {
            **live,
            "metadata": _without_managed(meta),
        }
        meta["managedFields"] = managed
        if unchanged:
            assert current is not None
            current["metadata"]["managedFields"] = managed  # A no-op apply moves no resourceVersion.
            return 200, current
        meta["resourceVersion"] = str(self._next_rv())
        self.objects[collection][(namespace, name)] = live
        self._record(collection, _Event(self.rv, "MODIFIED" if current else "ADDED", live, current), True)
        return (200 if current is not None else 201), live

    # --- what a cluster's controllers would do ------------------------------------------------------

    def set_ready(self, namespace: str, name: str, *, ready: bool = True) -> dict[str, Any]:
        """Write a Deployment's status as the deployment controller does once its pods are available
        (``ready=True``) or while none is (``False``): observedGeneration, replicas, updated, ready,
        available. Returns the stored object; watchers see a MODIFIED event."""
        current = self.objects["deployments"][(namespace, name)]
        live = copy.deepcopy(current)
        replicas = int((live.get("spec") or {}).get("replicas", 1))
        count = replicas if ready else 0
        live["status"] = {
            "observedGeneration": live["metadata"].get("generation", 1),
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": count,
            "availableReplicas": count,
        }
        if not ready:
            live["status"]["unavailableReplicas"] = replicas
        live["metadata"]["resourceVersion"] = str(self._next_rv())
        self.objects["deployments"][(namespace, name)] = live
        self._record("deployments", _Event(self.rv, "MODIFIED", live, current), True)
        return live


# --- helpers of the apply approximation -----------------------------------------------------------

_SERVER_OWNED_META = frozenset(
    {"uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp", "managedFields", "selfLink"}
)


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _collection_of(request: web.Request) -> Kind:
    """The collection a request for one object names: the path segment before the object's name."""
    return cast(Kind, request.path.rstrip("/").split("/")[-2])


def _resource(collection: str) -> str:
    """``deployments.apps``, ``services``: how the API server names a resource in its messages."""
    group = _GROUPS[collection]
    return f"{collection}.{group}" if group else collection


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _leaf_paths(obj: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every field a configuration sets: dict keys recursively; a list or scalar is one field."""
    if isinstance(obj, dict) and obj:
        return set().union(*(_leaf_paths(value, (*prefix, str(key))) for key, value in obj.items()))
    return {prefix} if prefix else set()


def _fields_v1(paths: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return tree


def _paths_of(entry: Mapping[str, Any]) -> set[tuple[str, ...]]:
    def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> set[tuple[str, ...]]:
        if not node:
            return {prefix} if prefix else set()
        return set().union(*(walk(child, (*prefix, key[2:])) for key, child in node.items() if key.startswith("f:")))

    return walk(entry.get("fieldsV1") or {}, ())


def _managed_entry(manager: str, operation: str, paths: Iterable[tuple[str, ...]], api_version: str) -> dict[str, Any]:
    """One ``metadata.managedFields`` entry: who set which fields, and how (Apply or Update)."""
    owned = {p for p in paths if p[:2] not in (("metadata", "name"), ("metadata", "namespace"))}
    return {
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": _now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": _fields_v1(owned),
    }


_MISSING = object()


def _get_path(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def _has_path(obj: Any, path: tuple[str, ...]) -> bool:
    return _get_path(obj, path) is not _MISSING


def _delete_path(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    parent = _get_path(obj, path[:-1])
    if isinstance(parent, dict):
        parent.pop(path[-1], None)


def _merge_into(live: dict[str, Any], applied: Mapping[str, Any]) -> None:
    for key, value in applied.items():
        if isinstance(value, dict) and value and isinstance(live.get(key), dict):
            _merge_into(live[key], value)
        else:
            live[key] = copy.deepcopy(value)


def _merge_patch(live: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            live.pop(key, None)
        elif isinstance(value, dict):
            target = live.get(key)
            if not isinstance(target, dict):
                target = live[key] = {}
            _merge_patch(target, value)
        else:
            live[key] = copy.deepcopy(value)


def _without_managed(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in ("managedFields", "resourceVersion")}


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


def service_object(
    name: str,
    *,
    namespace: str = "shop",
    selector: Mapping[str, str],
    ports: Sequence[Mapping[str, Any]] = ({"port": 80, "targetPort": 8080},),
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"selector": dict(selector), "ports": [dict(port) for port in ports]},
    }


def group_config_map(
    group: str,
    keys: str | Sequence[str],
    *,
    namespace: str = "shop",
    name: str | None = None,
    data: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A v1 ConfigMap declaring route group ``group`` (label ``devstack.io/route-group``, data
    ``group`` and ``keys``); ``keys`` as a list is written comma-separated, a string as it is."""
    if data is None:
        data = {"group": group, "keys": keys if isinstance(keys, str) else ",".join(keys)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name or f"devstack-group-{group}",
            "namespace": namespace,
            "labels": {"devstack.io/route-group": group},
        },
        "data": dict(data),
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
    ``fault`` is set, it is asked once per list or watch request, with the request's collection,
    and its answer replaces the normal one: ``"500"`` or ``"429"`` (with ``Retry-After:
    retry_after``) or ``"close"`` (the connection is cut before any response byte). ``faults``
    records what each request got, when, and of which collection.
    """

    def __init__(self, sock: socket.socket | None = None, *, retry_after: int = 1) -> None:
        super().__init__()
        self.sock = sock
        """Owned from here on: listened on by ``start``, closed by ``close`` (started or not)."""
        self.port = sock.getsockname()[1] if sock is not None else 0
        self.url = f"http://127.0.0.1:{self.port}" if sock is not None else ""
        self.retry_after = retry_after
        self.fault: Callable[[str], Fault | None] | None = None
        self.faults: list[tuple[float, Fault, str]] = []

    async def start(self) -> None:
        app = web.Application()
        self._add_routes(app)
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
            fault = self.fault(collection) if self.fault is not None else None
            if fault is None:
                return cast(web.StreamResponse, await healthy(request))
            self.requests.append(Recorded("GET", collection, request.match_info.get("namespace"), dict(request.query)))
            self.faults.append((time.monotonic(), fault, collection))
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
