"""``devstack controller``: one source, the aggregator and the ``/v1/routes`` server in one process.

This module only composes: it builds the source (a route file, re-read on change and on SIGHUP,
or the ``KubernetesSource`` with leak detection and, with ``--delete-expired``, deletion of
expired overrides), feeds it into an ``Aggregator`` whose tables go to a ``RoutePublisher``,
serves that over HTTP, and handles SIGTERM/SIGINT. It decides nothing about routing, and it is
the one place where the source's status meets the HTTP layer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controller.aggregator import Aggregator
from controller.build import BuildError
from controller.publish import PublishSettings, RoutePublisher, make_publish_app
from controller.sources.file import FileSource
from controller.startup import StartupError, bind_failure, parse_listen

if TYPE_CHECKING:
    from controller.sources.kubernetes import KubernetesSource, KubeSettings

log = logging.getLogger(__name__)

__all__ = ["Controller", "parse_listen", "run_controller"]

DEFAULT_LISTEN = "127.0.0.1:9902"
KUBERNETES_EXTRA = "pip install 'devstack-router[kubernetes]'"


class Controller:
    """One running controller: source task, aggregator, publisher and HTTP listener.

    With ``routes`` it serves a route file (the router's ``--routes`` source, so routers can follow
    a controller without a cluster); otherwise it watches Kubernetes.
    """

    def __init__(
        self,
        *,
        routes: str | os.PathLike[str] | None = None,
        namespaces: Sequence[str] = (),
        listen: str = DEFAULT_LISTEN,
        delete_expired: bool = False,
        configuration: Any = None,
        settings: KubeSettings | None = None,
        publish_settings: PublishSettings | None = None,
    ) -> None:
        self.listen = parse_listen(listen)
        self.publisher = RoutePublisher()
        self.source: FileSource | KubernetesSource
        if routes is not None:
            self.aggregator = Aggregator([FileSource.name], self.publisher.publish)
            self.source = FileSource(routes, self.aggregator.update, self.aggregator.report_error)
        else:
            # Imported only here: a controller serving a file runs without the Kubernetes client.
            from controller.sources.kubernetes import KubernetesSource  # noqa: PLC0415

            self.aggregator = Aggregator([KubernetesSource.name], self.publisher.publish)
            self.source = KubernetesSource(
                self.aggregator.update,
                self.aggregator.report_error,
                namespaces=namespaces,
                settings=settings,
                configuration=configuration,
                delete_expired=delete_expired,
                detect_leaks=True,
            )
        self._publish_settings = publish_settings
        self._runner: web.AppRunner | None = None
        self.task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] = ("", 0)

    def status(self) -> Mapping[str, object]:
        """What the source adds to each published document (watches, conflicts, leaks: Kubernetes only)."""
        return {} if isinstance(self.source, FileSource) else self.source.status()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once the first complete snapshot is published; watch trouble shows in the detail."""
        ready = self.aggregator.ready and self.publisher.table.version > 0
        detail: dict[str, Any] = {"errors": dict(self.aggregator.errors)}
        if not isinstance(self.source, FileSource):
            status = self.source.status()
            detail.update(watches=status["watches"], conflicts=status["conflicts"], leaks=len(self.source.leaks))
        return ready, detail

    async def start(self) -> None:
        """Read the route file (raising ``BuildError`` if it fails), bind, and start the source."""
        if isinstance(self.source, FileSource):
            # Before binding: a controller that cannot read its file must not serve an empty table.
            self.source.load_first()
        app = make_publish_app(
            self.publisher,
            readiness=self.readiness,
            status=self.status,
            settings=self._publish_settings,
            confirmed=self.aggregator.confirmed,  # the dashboard's source ages and failures
            failures=self.aggregator.failures,
        )
        # Streams end on shutdown (the publisher closes them), so a short grace period suffices.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen[0], self.listen[1], reuse_address=True)
        await site.start()
        server: Any = site._server  # aiohttp exposes the bound port only here
        self.address = server.sockets[0].getsockname()[:2]
        self.task = asyncio.create_task(self.source.run(), name=f"{self.source.name}-source")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait({self.task})  # Never raises: a failure was already reported by its owner.
            if not self.task.cancelled():
                self.task.exception()  # Mark it retrieved, so asyncio does not log it a second time.
        self.publisher.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _make_controller(args: argparse.Namespace) -> Controller:
    routes = getattr(args, "routes", None)
    try:
        return Controller(
            routes=routes,
            namespaces=args.namespace or (),
            listen=args.listen,
            delete_expired=args.delete_expired,
        )
    except ImportError as exc:
        raise StartupError(f"--kubernetes needs the Kubernetes client ({exc.name}): {KUBERNETES_EXTRA}") from None


async def run_controller(
    args: argparse.Namespace,
    *,
    on_started: Callable[[Controller], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``); 1 if the source dies, else 0.

    Raises ``StartupError`` for what the user can fix: a route file that fails validation, a
    listener address that cannot be bound, a Kubernetes client that is not installed.
    """
    controller = _make_controller(args)
    try:
        await controller.start()
    except BuildError as exc:
        await controller.close()
        raise StartupError(str(exc)) from None
    except OSError as exc:
        await controller.close()
        raise bind_failure(f"--listen {args.listen}", exc) from None
    source = controller.source
    if isinstance(source, FileSource):
        watching = f"serving {source.path} (re-read on change and on SIGHUP)"
    else:
        watching = "watching " + (", ".join(args.namespace) if args.namespace else "all namespaces")
        watching += " (deleting expired overrides)" if args.delete_expired else ""
    log.info(
        "devstack controller on %s:%d %s, table v%d", *controller.address, watching, controller.publisher.table.version
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Not on the main thread (tests).
            loop.add_signal_handler(sig, stop.set)
    if isinstance(source, FileSource):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, source.reload)
    if on_started is not None:
        on_started(controller)
    assert controller.task is not None
    stopping = asyncio.create_task(stop.wait(), name="controller-stop")
    await asyncio.wait({stopping, controller.task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if controller.task.done() and not controller.task.cancelled() and controller.task.exception() is not None:
        log.error("%s source failed: %s", source.name, controller.task.exception())
        code = 1
    stopping.cancel()
    await controller.close()
    return code
