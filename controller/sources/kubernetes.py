"""The Kubernetes source: list+watch labelled Deployments, group ConfigMaps and Services into snapshots.

This module owns every conversation with the API server and is the only one that imports the
official ``kubernetes`` client. Each watched collection (Deployments labelled
``devstack.io/service``, ConfigMaps labelled ``devstack.io/route-group``, Services; all
namespaces or one per namespace) runs list → watch → relist in its own daemon thread, because the
client blocks; the thread hands raw JSON to the event loop with ``call_soon_threadsafe`` and keeps
nothing itself. On the loop, events only update a cache and mark it dirty (level-triggered); the
table is rebuilt from the whole cache with the pure ``kube_build``, coalescing bursts, and at the
next override expiry. It never publishes before every collection has been listed once (a table
without its route groups would send a group's requests to the baselines, one without the Services
would speak HTTP/1.1 to an h2c service),
never merges a relist into stale state (a relist replaces its collection), and never deletes a
Deployment unless ``delete_expired`` was asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypedDict, cast

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from controller.aggregator import SourceDown
from controller.backoff import Backoff
from controller.kube_build import (
    GROUP_LABEL,
    SERVICE_LABEL,
    ConfigMap,
    Deployment,
    Expiry,
    KubeRoutes,
    Leak,
    ObjectMeta,
    Service,
    find_leaks,
    routes_from_deployments,
)
from router.table import Routes

if TYPE_CHECKING:
    from controller.aggregator import Aggregator

log = logging.getLogger(__name__)

# The client imports each API and model module lazily on first attribute access, about half a
# second apiece of CPU that starves the event loop of the GIL if it happens while serving; touch
# the ones we use now, at import time, so that cost is paid once at process start.
_CLIENT_NAMES: Final = ("ApiClient", "ApiException", "AppsV1Api", "CoreV1Api", "V1DeleteOptions", "V1Preconditions")
for _name in _CLIENT_NAMES:
    getattr(k8s, _name)

__all__ = [
    "Collection",
    "KubeSettings",
    "KubernetesSource",
    "WatchSettings",
    "kubernetes_source",
    "load_configuration",
]

HTTP_GONE: Final = 410
_MAX_EVENT_BYTES: Final = 16 * 1024 * 1024
"""One watch event carries one object; etcd caps objects at 1.5 MiB, so 16 MiB means a broken stream."""
_SEND_ONCE: Final = urllib3.Retry(total=0, redirect=False, respect_retry_after_header=False)
"""urllib3 sends each request once and hands back what came of it, so that every retry is the
watcher's backoff's decision, capped and visible in the log and /readyz. Anything it retried itself
would wait in the watcher thread, out of sight: a 429/503 with ``Retry-After`` up to three times,
each for as long as the header says (hours), where ``stop`` cannot interrupt it. ``total=0``, not
``False``: a refused connection still raises ``MaxRetryError``, whose message names the API server's
host and port. Not following redirects: the API server never sends one for a list, watch or delete,
so a 3xx is reported as it is instead of being followed with our credentials."""


@dataclasses.dataclass(frozen=True, slots=True)
class WatchSettings:
    """How one collection is listed and watched; defaults follow client-go's reflector."""

    connect_timeout: float = 10.0
    """A TCP/TLS connect that takes longer than this is a dead API server endpoint, not a slow one."""
    read_timeout: float = 80.0
    """With bookmarks the API server writes at least every ~60 s, so 80 s of silence is a dead stream."""
    server_timeout: int = 300
    """Asked of the API server per watch (jittered up to 2x, as client-go does) so streams end cleanly
    and get re-established through load balancers instead of living until some idle timeout cuts them."""
    backoff_initial: float = 0.8
    """client-go's reflector starts at 800 ms: long enough not to hammer a restarting API server."""
    backoff_max: float = 30.0
    """Never wait longer than this: a router that lags the cluster by minutes is worse than extra lists."""
    healthy_after: float = 120.0
    """A watch that stayed up this long proves the connection works; the backoff starts over."""
    page_size: int = 500
    """List in pages so a big namespace does not make one huge response the API server must build."""


@dataclasses.dataclass(frozen=True, slots=True)
class KubeSettings:
    """The source as a whole: watching, rebuilding and cleaning up."""

    watch: WatchSettings = dataclasses.field(default_factory=WatchSettings)
    coalesce: float = 0.1
    """After the first event of a burst, wait this long before rebuilding: a rollout or a relist
    of 1000 Deployments becomes one or two rebuilds, well inside the 1 s routing budget."""
    delete_retry: float = 30.0
    """A failed delete of an expired Deployment (RBAC, API error) is retried this often, not hot."""
    join_timeout: float = 2.0
    """How long shutdown waits for a watcher thread; they are daemons, so a stuck one cannot block exit."""


CollectionKind = Literal["deployments", "configmaps", "services"]


@dataclasses.dataclass(frozen=True, slots=True)
class Collection:
    """One list+watch target: a resource kind in one namespace, or in all of them."""

    kind: CollectionKind
    namespace: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.namespace or '*'}"

    @property
    def label_selector(self) -> str | None:
        # Only labelled Deployments and ConfigMaps matter; Services are matched by name, so all are needed.
        return {"deployments": SERVICE_LABEL, "configmaps": GROUP_LABEL}.get(self.kind)


class _WatchEvent(TypedDict, total=False):
    type: str
    object: dict[str, Any]


class _Status(TypedDict, total=False):
    """The ``Status`` object of an ERROR watch event."""

    code: int
    reason: str
    message: str


class Outcome(enum.Enum):
    """Why a list+watch cycle ended; each leads to a relist, only some count as failures."""

    GONE = "gone"
    ENDED = "ended"
    TIMEOUT = "timeout"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True, slots=True)
class WatchState:
    """What one collection's watcher last reported; rendered in /v1/routes and /readyz."""

    connected: bool = False
    resource_version: str = ""
    lists: int = 0
    last_outcome: str | None = None
    last_error: str | None = None
    since: float = 0.0

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class KubeWatchError(SourceDown, RuntimeError):
    """The API server refused or broke a list or watch; the message says which collection and how.

    A ``SourceDown``: each watcher logs its own failures with the delay before it relists, so the
    aggregator only records them for ``/readyz``."""


@dataclasses.dataclass(frozen=True, slots=True)
class _CycleResult:
    outcome: Outcome
    detail: str = ""
    retry_after: float | None = None


def _object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = cast(ObjectMeta, obj.get("metadata") or {})
    return (meta.get("namespace", ""), meta.get("name", ""))


def _retry_after(exc: Any) -> float | None:
    """The seconds of an error's ``Retry-After``, unbounded: the watch loop caps it at ``backoff_max``."""
    headers = getattr(exc, "headers", None)
    raw: str | None = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None  # An HTTP-date Retry-After; the API server only sends seconds.


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """Complete newline-terminated lines of a chunked watch stream, as they arrive."""
    buffer = bytearray()
    for segment in response.stream(amt=None, decode_content=False):
        buffer += segment
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            if end > start:
                yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
        if len(buffer) > _MAX_EVENT_BYTES:
            raise ValueError(f"watch event longer than {_MAX_EVENT_BYTES} bytes")
    # A partial line at the end is a stream cut mid-event: say so, never parse half an object.
    if buffer.strip():
        raise urllib3.exceptions.ProtocolError("watch stream ended inside an event")


class _Sink(Protocol):
    """The loop-side receiver of a watcher's reports; its methods run on the event loop only."""

    def replace(self, collection: Collection, items: list[dict[str, Any]]) -> None: ...

    def apply(self, collection: Collection, event_type: str, obj: dict[str, Any]) -> None: ...

    def report(self, collection: Collection, state: WatchState, error: str | None) -> None: ...

    def finished(self, collection: Collection) -> None: ...


class CollectionWatcher:
    """list → watch(resourceVersion, bookmarks) → relist for one collection, in a daemon thread."""

    def __init__(
        self,
        collection: Collection,
        api: Any,
        sink: _Sink,
        loop: asyncio.AbstractEventLoop,
        settings: WatchSettings,
        *,
        iterations: int | None = None,
    ) -> None:
        self.collection = collection
        self._sink = sink
        self._loop = loop
        self._settings = settings
        self._iterations = iterations
        self._stop = threading.Event()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._thread = threading.Thread(target=self._run, name=f"kube-watch {collection.name}", daemon=True)
        self._state = WatchState()
        self._api = api
        self._call: Callable[..., Any] | None = None

    def _list_method(self) -> Callable[..., Any]:
        """The client's list/watch method for this collection."""
        namespace = self.collection.namespace
        if self.collection.kind == "deployments":
            apps = k8s.AppsV1Api(self._api)
            if namespace is None:
                return cast(Callable[..., Any], apps.list_deployment_for_all_namespaces)
            return _bind_namespace(apps.list_namespaced_deployment, namespace)
        core = k8s.CoreV1Api(self._api)
        if self.collection.kind == "configmaps":
            if namespace is None:
                return cast(Callable[..., Any], core.list_config_map_for_all_namespaces)
            return _bind_namespace(core.list_namespaced_config_map, namespace)
        if namespace is None:
            return cast(Callable[..., Any], core.list_service_for_all_namespaces)
        return _bind_namespace(core.list_namespaced_service, namespace)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and unblock a read it may be parked in (called from the loop)."""
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()
            except (AttributeError, ValueError, RuntimeError, OSError):
                pass  # Already closed or released by the thread: nothing left to unblock.

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # --- everything below runs in the watcher thread ---------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            self._stop.set()  # The loop is closed: nobody is listening any more.

    def _report(self, error: str | None = None, **changes: Any) -> None:
        self._state = dataclasses.replace(self._state, since=time.time(), **changes)
        self._post(self._sink.report, self.collection, self._state, error)

    def _run(self) -> None:
        self._call = self._list_method()
        backoff = Backoff(self._settings.backoff_initial, self._settings.backoff_max)
        cycles = 0
        previous = Outcome.ENDED
        try:
            while not self._stop.is_set() and (self._iterations is None or cycles < self._iterations):
                cycles += 1
                started = time.monotonic()
                try:
                    result = self._cycle(consistent=previous is Outcome.GONE)
                except Exception as exc:  # A dead watcher would mean a silently stale table: never die.
                    log.exception("%s: unexpected error", self.collection.name)
                    result = _CycleResult(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
                if result.outcome is Outcome.STOPPED:
                    break
                previous = result.outcome
                if time.monotonic() - started >= self._settings.healthy_after:
                    backoff.reset()
                delay = backoff.next_delay()
                if result.retry_after is not None:
                    # Honour the API server's Retry-After (429 priority-and-fairness, 5xx) up to our cap.
                    delay = max(delay, min(result.retry_after, self._settings.backoff_max))
                failure = result.outcome is Outcome.FAILED
                (log.warning if failure else log.info)(
                    "%s: %s%s; relisting in %.2fs",
                    self.collection.name,
                    result.outcome.value,
                    f" ({result.detail})" if result.detail else "",
                    delay,
                )
                self._report(
                    error=f"{self.collection.name}: {result.detail}" if failure else None,
                    connected=False,
                    last_outcome=result.outcome.value,
                    last_error=result.detail or None,
                )
                if (self._iterations is None or cycles < self._iterations) and self._stop.wait(delay):
                    break
        finally:
            self._post(self._sink.finished, self.collection)

    def _cycle(self, *, consistent: bool) -> _CycleResult:
        try:
            items, version = self._list(consistent=consistent)
        except k8s.ApiException as exc:
            outcome = Outcome.GONE if exc.status == HTTP_GONE else Outcome.FAILED
            return _CycleResult(outcome, f"list: HTTP {exc.status} {exc.reason}", _retry_after(exc))
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            return _CycleResult(Outcome.FAILED, f"list: {type(exc).__name__}: {exc}")
        if self._stop.is_set():
            return _CycleResult(Outcome.STOPPED)
        self._post(self._sink.replace, self.collection, items)
        self._report(resource_version=version, lists=self._state.lists + 1, last_error=None)
        return self._watch(version)

    def _list(self, *, consistent: bool) -> tuple[list[dict[str, Any]], str]:
        """Every object of the collection, page by page, and the list's resourceVersion.

        After a healthy watch the relist may be served from the API server's watch cache
        (``NotOlderThan`` the last version we saw: cheap, and never older than what we had);
        after a 410 it must be a consistent read, because our version is the one that expired.
        """
        items: list[dict[str, Any]] = []
        token: str | None = None
        version = self._state.resource_version
        timeout = (self._settings.connect_timeout, self._settings.read_timeout)
        while True:
            kwargs: dict[str, Any] = {"limit": self._settings.page_size}
            if token:
                kwargs["_continue"] = token
            elif version and not consistent:
                kwargs["resource_version"] = version
                kwargs["resource_version_match"] = "NotOlderThan"
            if self.collection.label_selector:
                kwargs["label_selector"] = self.collection.label_selector
            assert self._call is not None
            response = self._call(_preload_content=False, _request_timeout=timeout, **kwargs)
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
            if not isinstance(body, dict):
                raise ValueError("list response is not a JSON object")
            items.extend(item for item in body.get("items") or [] if isinstance(item, dict))
            meta = body.get("metadata") or {}
            token = meta.get("continue") or None
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def _watch(self, version: str) -> _CycleResult:
        timeout = (self._settings.connect_timeout, self._settings.read_timeout)
        server_timeout = int(self._settings.server_timeout * (1 + random.random()))  # noqa: S311 - jitter
        assert self._call is not None
        try:
            response = self._call(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=server_timeout,
                label_selector=self.collection.label_selector,
                _preload_content=False,
                _request_timeout=timeout,
            )
        except k8s.ApiException as exc:
            outcome = Outcome.GONE if exc.status == HTTP_GONE else Outcome.FAILED
            return _CycleResult(outcome, f"watch: HTTP {exc.status} {exc.reason}", _retry_after(exc))
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            return _CycleResult(Outcome.FAILED, f"watch: {type(exc).__name__}: {exc}")
        self._response = response
        self._report(connected=True)
        try:
            if self._stop.is_set():
                return _CycleResult(Outcome.STOPPED)
            for line in _lines(response):
                event = cast(_WatchEvent, json.loads(line))
                event_type = event.get("type", "")
                obj = event.get("object") or {}
                if event_type == "ERROR":
                    status = cast(_Status, obj)
                    detail = f"watch: {status.get('code')} {status.get('reason', '')}: {status.get('message', '')}"
                    return _CycleResult(Outcome.GONE if status.get("code") == HTTP_GONE else Outcome.FAILED, detail)
                # Every event, bookmarks included, moves our position forward: the next relist
                # can be served from the watch cache at a version no older than this one.
                meta = cast(ObjectMeta, obj.get("metadata") or {})
                if meta.get("resourceVersion"):
                    self._state = dataclasses.replace(self._state, resource_version=meta["resourceVersion"])
                if event_type in ("ADDED", "MODIFIED", "DELETED"):
                    self._post(self._sink.apply, self.collection, event_type, obj)
                if self._stop.is_set():
                    return _CycleResult(Outcome.STOPPED)
            return _CycleResult(Outcome.ENDED, f"stream closed at resourceVersion {self._state.resource_version}")
        except urllib3.exceptions.ReadTimeoutError:
            if self._stop.is_set():
                return _CycleResult(Outcome.STOPPED)
            return _CycleResult(Outcome.TIMEOUT, f"no bytes for {self._settings.read_timeout:g}s")
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            if self._stop.is_set():
                return _CycleResult(Outcome.STOPPED)
            return _CycleResult(Outcome.FAILED, f"watch stream: {type(exc).__name__}: {exc}")
        finally:
            self._response = None
            response.close()
            response.release_conn()


def _bind_namespace(method: Callable[..., Any], namespace: str) -> Callable[..., Any]:
    def call(**kwargs: Any) -> Any:
        return method(namespace, **kwargs)

    return call


def load_configuration() -> Any:
    """The standard client configuration: in-cluster in a pod, else ``KUBECONFIG`` / ``~/.kube/config``."""
    configuration = k8s.Configuration()
    loader: Any = k8s_config  # The client's config module is partly annotated; treat it as untyped.
    try:
        loader.load_incluster_config(client_configuration=configuration)
    except loader.ConfigException:
        try:
            # Read KUBECONFIG now: the client reads it once, at import time, as its default path.
            loader.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
        except (loader.ConfigException, OSError) as exc:
            raise KubeWatchError(
                f"no Kubernetes configuration: not running in a pod, and KUBECONFIG / ~/.kube/config: {exc}"
            ) from None
    return configuration


SnapshotCallback = Callable[[str, Mapping[str, Routes]], object]
ErrorCallback = Callable[[str, Exception], None]


class KubernetesSource:
    """Keeps a cache of labelled Deployments, group ConfigMaps and Services and publishes a snapshot on change."""

    name = "kubernetes"

    def __init__(
        self,
        on_snapshot: SnapshotCallback,
        on_error: ErrorCallback,
        *,
        namespaces: Sequence[str] = (),
        settings: KubeSettings | None = None,
        configuration: Any = None,
        delete_expired: bool = False,
        detect_leaks: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._on_snapshot = on_snapshot
        self._on_error = on_error
        self.namespaces = tuple(dict.fromkeys(namespaces))
        self.settings = settings or KubeSettings()
        self._configuration = configuration
        self.delete_expired = delete_expired
        self.detect_leaks = detect_leaks
        self._clock = clock
        kinds: tuple[CollectionKind, ...] = ("deployments", "configmaps", "services")
        self.collections = tuple(Collection(kind, ns) for kind in kinds for ns in (self.namespaces or (None,)))
        self._cache: dict[Collection, dict[tuple[str, str], dict[str, Any]]] = {}
        self._finished: set[Collection] = set()
        self._dirty = asyncio.Event()
        self._deleting: dict[str, float] = {}
        """uid → when its delete was last attempted; a Deployment is deleted once, retried slowly."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._api: Any = None
        self.result = KubeRoutes({})
        self.leaks: tuple[Leak, ...] = ()
        self.watches: dict[str, WatchState] = {c.name: WatchState() for c in self.collections}
        self.rebuilds = 0
        """How many times the table was rebuilt from the cache (tests check bursts coalesce)."""
        self.published = False

    # --- the watcher threads' sink: called on the loop via call_soon_threadsafe --------------------------------------

    def replace(self, collection: Collection, items: list[dict[str, Any]]) -> None:
        self._cache[collection] = {_object_key(item): item for item in items}
        self._dirty.set()

    def apply(self, collection: Collection, event_type: str, obj: dict[str, Any]) -> None:
        objects = self._cache.setdefault(collection, {})
        if event_type == "DELETED":
            objects.pop(_object_key(obj), None)
        else:
            objects[_object_key(obj)] = obj
        self._dirty.set()

    def report(self, collection: Collection, state: WatchState, error: str | None) -> None:
        self.watches[collection.name] = state
        if error is not None:
            self._on_error(self.name, KubeWatchError(error))

    def finished(self, collection: Collection) -> None:
        self._finished.add(collection)
        self._dirty.set()

    # --- the loop side -----------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """Every collection has been listed at least once: each is part of the table (Services say
        which protocol a service speaks: their ports' ``appProtocol`` and annotations)."""
        return all(c in self._cache for c in self.collections)

    def _objects(self, kind: CollectionKind) -> list[dict[str, Any]]:
        return [obj for c in self.collections if c.kind == kind for obj in self._cache.get(c, {}).values()]

    def rebuild(self) -> None:
        """Rebuild from the whole cache and publish; a no-op until every collection is listed."""
        self.rebuilds += 1
        if not self.synced:
            return
        deployments = cast(list[Deployment], self._objects("deployments"))
        services = cast(list[Service], self._objects("services"))
        result = routes_from_deployments(deployments, cast(list[ConfigMap], self._objects("configmaps")), services)
        _log_new("conflict", self.result.conflicts, result.conflicts)
        _log_new("unusable", self.result.invalid, result.invalid)  # a Deployment, a group ConfigMap, a Service
        self.result = result
        if self.detect_leaks:
            leaks = find_leaks(deployments, services)
            _log_new("leak", [x.message for x in self.leaks], [x.message for x in leaks])
            self.leaks = leaks
        self._on_snapshot(self.name, result.services)
        self.published = True
        if self.delete_expired:
            self._delete(result.expired(self._clock()))

    def _next_wakeup(self) -> float | None:
        """Seconds until the next override expires: the table must be rebuilt then, event or not."""
        now = self._clock()
        due = self.result.next_expiry(now)
        return None if due is None else max(0.0, due - now)

    async def run(self, *, _iterations: int | None = None) -> None:
        """Watch until cancelled (or, for tests, until each watcher ran ``_iterations`` cycles)."""
        loop = asyncio.get_running_loop()
        configuration = self._configuration
        if configuration is None:
            configuration = await asyncio.to_thread(load_configuration)
        api = await asyncio.to_thread(self._make_client, configuration)
        watchers = [
            CollectionWatcher(c, api, self, loop, self.settings.watch, iterations=_iterations) for c in self.collections
        ]
        self._api = api
        for watcher in watchers:
            watcher.start()
        try:
            await self._rebuild_loop()
            if _iterations is None:
                raise KubeWatchError("every watcher thread stopped; the route table would go stale")
        finally:
            for watcher in watchers:
                watcher.stop()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.to_thread(_join_all, watchers, self.settings.join_timeout)
            api.rest_client.pool_manager.clear()

    def _make_client(self, configuration: Any) -> Any:
        """The API client, built in a thread because it may read CA files for TLS."""
        # One connection per watcher plus room for lists and deletes, so urllib3 never discards one.
        configuration.connection_pool_maxsize = max(
            getattr(configuration, "connection_pool_maxsize", 0) or 0, len(self.collections) + 4
        )
        # Whatever the configuration asked for: a retry made below us would bypass the backoff's cap.
        configuration.retries = _SEND_ONCE
        # The client's own client-go-style retry loop (newer clients, off by default) sleeps on
        # Retry-After around urllib3; keep it off for the same reason.
        configuration.client_go_retries = False
        return k8s.ApiClient(configuration)

    async def _rebuild_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self._next_wakeup())
                # Let the rest of a burst land: one rebuild for many events (level-triggered).
                await asyncio.sleep(self.settings.coalesce)
            except TimeoutError:
                pass  # An override expired: rebuild (and maybe delete) with no event to prompt it.
            self._dirty.clear()
            self.rebuild()
            if len(self._finished) == len(self.collections):
                return

    def _delete(self, expired: Sequence[Expiry]) -> None:
        now = time.monotonic()
        for expiry in expired:
            last = self._deleting.get(expiry.uid)
            if last is not None and now - last < self.settings.delete_retry:
                continue
            self._deleting[expiry.uid] = now
            name = f"delete-expired {expiry.namespace}/{expiry.name}"
            task = asyncio.create_task(self._delete_one(expiry), name=name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _delete_one(self, expiry: Expiry) -> None:
        try:
            await asyncio.to_thread(self._delete_blocking, expiry)
        except k8s.ApiException as exc:
            if exc.status in (404, 409):
                return  # Already gone, or replaced by a newer Deployment: nothing of ours to delete.
            log.warning(
                "cannot delete expired %s/%s: HTTP %s %s", expiry.namespace, expiry.name, exc.status, exc.reason
            )
            asyncio.get_running_loop().call_later(self.settings.delete_retry, self._dirty.set)
            return
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("cannot delete expired %s/%s: %s", expiry.namespace, expiry.name, exc)
            asyncio.get_running_loop().call_later(self.settings.delete_retry, self._dirty.set)
            return
        log.info(
            "deleted expired override %s/%s (%s, key %s)", expiry.namespace, expiry.name, expiry.service, expiry.key
        )

    def _delete_blocking(self, expiry: Expiry) -> None:
        # In a thread: the call blocks, and the first use of the client's models imports them.
        options = k8s.V1DeleteOptions(
            propagation_policy="Background",
            # The uid precondition: never delete a same-named Deployment someone created since.
            preconditions=k8s.V1Preconditions(uid=expiry.uid) if expiry.uid else None,
        )
        k8s.AppsV1Api(self._api).delete_namespaced_deployment(
            expiry.name,
            expiry.namespace,
            body=options,
            _request_timeout=(self.settings.watch.connect_timeout, self.settings.watch.read_timeout),
        )

    def status(self) -> dict[str, object]:
        """Conflicts, unusable Deployments and ConfigMaps, leaks, expired overrides and watch health, as JSON."""
        now = self._clock()
        return {
            "conflicts": list(self.result.conflicts),
            "invalid": list(self.result.invalid),
            "leaks": [leak.to_json() for leak in self.leaks],
            "expired": [
                {
                    "service": e.service,
                    "key": e.key,
                    "namespace": e.namespace,
                    "deployment": e.name,
                    "expired_at": e.expires_at,
                }
                for e in self.result.expired(now)
            ],
            "watches": {name: state.to_json() for name, state in sorted(self.watches.items())},
        }


def _join_all(watchers: Sequence[CollectionWatcher], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for watcher in watchers:
        watcher.join(max(0.0, deadline - time.monotonic()))


def _log_new(what: str, before: Sequence[str], after: Sequence[str]) -> None:
    """Log each message once, when it appears; a rebuild every second must not repeat them."""
    seen = set(before)
    for message in after:
        if message not in seen:
            log.warning("%s: %s", what, message)


SourceFactory = Callable[["Aggregator"], Coroutine[Any, Any, None]]


def kubernetes_source(
    *,
    namespaces: Sequence[str] = (),
    settings: KubeSettings | None = None,
    configuration: Any = None,
    delete_expired: bool = False,
    detect_leaks: bool = False,
) -> SourceFactory:
    """The router's ``--kubernetes`` source: a coroutine factory feeding an ``Aggregator``."""

    async def run(aggregator: Aggregator) -> None:
        source = KubernetesSource(
            aggregator.update,
            aggregator.report_error,
            namespaces=namespaces,
            settings=settings,
            configuration=configuration,
            delete_expired=delete_expired,
            detect_leaks=detect_leaks,
        )
        await source.run()

    return run
