"""The ``devstack`` command's conversation with the API server, for ``fork``, ``ls``, ``rm``, ``extend`` and ``group``.

It reads the configuration as kubectl does (``--kubeconfig``, else ``KUBECONFIG``, else
``~/.kube/config``, with ``--context`` choosing among its contexts; with none of those files,
the pod's service account), lists labelled Deployments and ConfigMaps, reads one Deployment,
Service or ConfigMap by name, writes with server-side apply (field manager ``devstack``) or, for a
TTL alone, a JSON merge patch guarded by the object's resourceVersion, and deletes with a uid
precondition. It is the one
module besides the controller's source that imports the ``kubernetes`` client (an import contract
says so), and it turns every failure into one sentence: RBAC refusals name the verb and the
resource, an unreachable API server its address and the reason. It decides nothing about overrides.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from controller.fork import FIELD_MANAGER, OverrideError, object_ref
from controller.startup import os_reason

__all__ = ["APPLY_PATCH", "MERGE_PATCH", "Forbidden", "Kind", "KubeApi", "connect"]

Kind = Literal["deployments", "services", "configmaps"]
APPLY_PATCH: Final = "application/apply-patch+yaml"
MERGE_PATCH: Final = "application/merge-patch+json"
_TIMEOUT: Final = (10.0, 30.0)
"""(connect, read) seconds for every request: a command must not hang on a dead API server."""
_PAGE: Final = 500
_RESOURCES: Final[dict[str, str]] = {
    "deployments": "deployments.apps",
    "services": "services",
    "configmaps": "configmaps",
}
_KINDS: Final[dict[str, Kind]] = {"Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps"}
"""How kubectl and the API server's messages name each resource (``resource.group``)."""
_SERVICE_ACCOUNT_NAMESPACE: Final = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def connect(kubeconfig: str | None = None, context: str | None = None) -> KubeApi:
    """An API client configured as kubectl would be; ``OverrideError`` if there is no configuration."""
    loader: Any = k8s_config  # The client's config module is untyped.
    configuration = k8s.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    present = [p for p in path.split(os.pathsep) if p and Path(p).expanduser().exists()]
    namespace: str | None = None
    if present or kubeconfig or context:
        try:
            contexts, current = loader.list_kube_config_contexts(config_file=path)
            if context is not None and context not in [c["name"] for c in contexts or []]:
                names = ", ".join(sorted(c["name"] for c in contexts or [])) or "none"
                raise OverrideError(f"kubeconfig {path}: no context {context!r} (it has: {names})")
            chosen = next((c for c in contexts or [] if c["name"] == context), current) if context else current
            namespace = ((chosen or {}).get("context") or {}).get("namespace")
            loader.load_kube_config(
                config_file=path, context=context, client_configuration=configuration, persist_config=False
            )
        except (loader.ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
            raise OverrideError(f"kubeconfig {path}: {exc}") from None
    else:
        try:
            loader.load_incluster_config(client_configuration=configuration)
        except loader.ConfigException:
            raise OverrideError(
                f"no Kubernetes configuration: no kubeconfig ({path}; set KUBECONFIG or --kubeconfig) "
                "and not running in a pod"
            ) from None
        try:
            namespace = Path(_SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or None
        except OSError:
            namespace = None
    # Every request is sent once: a command reports a failure at once instead of retrying in silence.
    configuration.retries = urllib3.Retry(total=0, redirect=False, respect_retry_after_header=False)
    return KubeApi(k8s.ApiClient(configuration), default_namespace=namespace)


class KubeApi:
    """The few requests the commands make, each answering plain JSON or an ``OverrideError``."""

    def __init__(self, api_client: Any, *, default_namespace: str | None = None) -> None:
        self._client = api_client
        self._apps = k8s.AppsV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        apps, core = self._apps, self._core
        self._read: dict[Kind, Callable[..., Any]] = {
            "deployments": apps.read_namespaced_deployment,
            "services": core.read_namespaced_service,
            "configmaps": core.read_namespaced_config_map,
        }
        self._patch: dict[Kind, Callable[..., Any]] = {
            "deployments": apps.patch_namespaced_deployment,
            "services": core.patch_namespaced_service,
            "configmaps": core.patch_namespaced_config_map,
        }
        self._delete: dict[Kind, Callable[..., Any]] = {
            "deployments": apps.delete_namespaced_deployment,
            "services": core.delete_namespaced_service,
            "configmaps": core.delete_namespaced_config_map,
        }
        self.server: str = api_client.configuration.host
        self.default_namespace = default_namespace
        """The kubeconfig context's namespace (or the pod's): where to look when a cluster-wide list is refused."""

    def close(self) -> None:
        self._client.close()

    # --- reads ------------------------------------------------------------------------------------

    def list_deployments(self, selector: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every Deployment matching ``selector``, in ``namespace`` or (None) in every namespace."""
        return self._list("deployments", selector, namespace)

    def list_config_maps(self, selector: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every ConfigMap matching ``selector``, in ``namespace`` or (None) in every namespace."""
        return self._list("configmaps", selector, namespace)

    def _list(
        self, kind: Literal["deployments", "configmaps"], selector: str, namespace: str | None
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        everywhere: Callable[..., Any]
        one: Callable[..., Any]
        if kind == "deployments":
            everywhere, one = self._apps.list_deployment_for_all_namespaces, self._apps.list_namespaced_deployment
        else:
            everywhere, one = self._core.list_config_map_for_all_namespaces, self._core.list_namespaced_config_map
        call: Callable[..., Any] = everywhere if namespace is None else functools.partial(one, namespace)
        while True:
            kwargs: dict[str, Any] = {"label_selector": selector, "limit": _PAGE, **_RAW}
            if token:
                kwargs["_continue"] = token
            body = self._json("list", kind, namespace, None, functools.partial(call, **kwargs))
            items.extend(item for item in body.get("items") or [] if isinstance(item, dict))
            token = (body.get("metadata") or {}).get("continue") or None
            if not token:
                return items

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """One object by name, or None if there is none."""
        read = self._read[kind]
        try:
            return self._json("get", kind, namespace, name, lambda: read(name, namespace, **_RAW))
        except _NotFound:
            return None

    # --- writes -----------------------------------------------------------------------------------

    def apply(self, obj: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        """Server-side apply of ``obj`` by field manager ``devstack``; ``force`` takes over fields
        that other managers (``kubectl set image``, an editor) own with other values."""
        kind = _KINDS[obj["kind"]]
        meta = obj["metadata"]
        patch = self._patch[kind]
        try:
            return self._json(
                "patch",
                kind,
                meta["namespace"],
                meta["name"],
                lambda: patch(
                    meta["name"],
                    meta["namespace"],
                    obj,
                    field_manager=FIELD_MANAGER,
                    force=force,
                    _content_type=APPLY_PATCH,
                    **_RAW,
                ),
            )
        except _Conflict as exc:
            raise OverrideError(
                f"{_RESOURCES[kind]} {object_ref(obj)}: {exc} (another field manager changed these fields; "
                "--replace takes them over)"
            ) from None

    def merge_patch(self, kind: Kind, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch; put ``metadata.resourceVersion`` in it to make it conditional (409 if moved)."""
        call = self._patch[kind]
        try:
            return self._json(
                "patch",
                kind,
                namespace,
                name,
                lambda: call(name, namespace, patch, field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH, **_RAW),
            )
        except _NotFound:
            raise OverrideError(f"{_RESOURCES[kind]} {namespace}/{name} is gone") from None
        except _Conflict:
            raise OverrideError(
                f"{_RESOURCES[kind]} {namespace}/{name} changed while this command ran; run it again"
            ) from None

    def delete(self, kind: Kind, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete one object (dependents in the background); False if it was already gone.

        With ``uid``, only that very object: never a same-named one created since it was read."""
        options = k8s.V1DeleteOptions(
            propagation_policy="Background", preconditions=k8s.V1Preconditions(uid=uid) if uid else None
        )
        call = self._delete[kind]
        try:
            self._json("delete", kind, namespace, name, lambda: call(name, namespace, body=options, **_RAW))
        except (_NotFound, _Conflict):
            return False  # Gone, or replaced by a newer object of the same name: not ours to delete.
        return True

    # --- one request, its answer or its failure as a sentence --------------------------------------------

    def _json(
        self, verb: str, kind: Kind, namespace: str | None, name: str | None, call: Callable[[], Any]
    ) -> dict[str, Any]:
        resource = _RESOURCES[kind]
        try:
            response = call()
        except k8s.ApiException as exc:
            raise self._failure(verb, resource, namespace, name, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise OverrideError(f"cannot reach the API server at {self.server}: {_reason(exc)}") from None
        try:
            body = json.loads(response.data)
        except ValueError:
            raise OverrideError(f"the API server at {self.server} answered {verb} {resource} with no JSON") from None
        finally:
            response.release_conn()
        if not isinstance(body, dict):
            raise OverrideError(f"the API server at {self.server} answered {verb} {resource} with no JSON object")
        return body

    def _failure(self, verb: str, resource: str, namespace: str | None, name: str | None, exc: Any) -> Exception:
        message = _status_message(exc)
        where = f"in namespace {namespace}" if namespace else "in all namespaces (cluster-wide)"
        if exc.status == 403:
            user = message.split('User "', 1)[1].split('"', 1)[0] if 'User "' in message else None
            who = f" for {user}" if user else ""
            return Forbidden(f"RBAC forbids {verb} on {resource} {where}{who}")
        if exc.status == 401:
            return OverrideError(f"the API server at {self.server} refused the credentials (401 Unauthorized)")
        if exc.status == 404 and name is not None:
            return _NotFound(message)
        if exc.status == 409:
            return _Conflict(message)
        what = f"{resource} {namespace}/{name}" if name else f"{resource} {where}"
        return OverrideError(f"{verb} {what}: HTTP {exc.status} {exc.reason}: {message}".rstrip(": "))


_RAW: Final[dict[str, Any]] = {"_preload_content": False, "_request_timeout": _TIMEOUT}
"""Answer the raw response (plain JSON, not the client's models), and never wait forever."""


class Forbidden(OverrideError):
    """RBAC refused the request; a command may retry where the user has rights (one namespace)."""


class _NotFound(Exception):
    pass


class _Conflict(Exception):
    pass


def _status_message(exc: Any) -> str:
    """The ``message`` of the API server's Status body, or the HTTP reason."""
    try:
        status = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return str(exc.reason or "")
    return str(status.get("message") or exc.reason or "") if isinstance(status, dict) else str(exc.reason or "")


def _reason(exc: BaseException) -> str:
    """``connection refused``, ``timed out``: the OS error behind urllib3's wrapping, if there is one."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        causes = (getattr(current, "reason", None), current.__cause__, current.__context__)
        current = next((c for c in causes if isinstance(c, BaseException)), None)
    for link in chain:
        if isinstance(link, OSError) and link.errno:
            return os_reason(link)
    # urllib3's NewConnectionError is a ConnectTimeoutError too, so timeouts are looked for only now.
    if any(isinstance(link, TimeoutError | urllib3.exceptions.TimeoutError) for link in chain):
        return "timed out"
    return str(exc)
