"""``devstack controller``: the Kubernetes source, the aggregator and the ``/v1/routes`` server in one process.

This module only composes: it builds the ``KubernetesSource`` (with leak detection, and deletion
of expired overrides when ``--delete-expired`` is given), feeds it into an ``Aggregator`` whose
tables go to a ``RoutePublisher``, serves that over HTTP, and handles SIGTERM/SIGINT. It decides
nothing about routing, and it is the one place where the source's status meets the HTTP layer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from controller.aggregator import Aggregator
from controller.publish import PublishSettings, RoutePublisher, make_publish_app
from controller.sources.kubernetes import KubernetesSource, KubeSettings

log = logging.getLogger("devstack.controller")

__all__ = ["Controller", "parse_listen", "run_controller"]

DEFAULT_LISTEN = "127.0.0.1:9902"


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[::1]:port`` → (host, port); the router's rules, repeated here
    because the controller must not import the router's server module."""
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return (host or "127.0.0.1", int(port))


class Controller:
    """One running controller: source task, aggregator, publisher and HTTP listener."""

    def __init__(
        self,
        *,
        namespaces: Sequence[str] = (),
        listen: str = DEFAULT_LISTEN,
        delete_expired: bool = False,
        configuration: Any = None,
        settings: KubeSettings | None = None,
        publish_settings: PublishSettings | None = None,
    ) -> None:
        self.listen = parse_listen(listen)
        self.publisher = RoutePublisher()
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

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once the first complete snapshot is published; watch trouble shows in the detail."""
        ready = self.aggregator.ready and self.publisher.table.version > 0
        status = self.source.status()
        return ready, {
            "errors": dict(self.aggregator.errors),
            "watches": status["watches"],
            "conflicts": status["conflicts"],
            "leaks": len(self.source.leaks),
        }

    async def start(self) -> None:
        app = make_publish_app(
            self.publisher, readiness=self.readiness, status=self.source.status, settings=self._publish_settings
        )
        # Streams end on shutdown (the publisher closes them), so a short grace period suffices.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen[0], self.listen[1], reuse_address=True)
        await site.start()
        server: Any = site._server  # aiohttp exposes the bound port only here
        self.address = server.sockets[0].getsockname()[:2]
        self.task = asyncio.create_task(self.source.run(), name="kubernetes-source")

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


async def run_controller(
    args: argparse.Namespace,
    *,
    on_started: Callable[[Controller], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``); 1 if the Kubernetes source dies, else 0."""
    controller = Controller(
        namespaces=args.namespace or (),
        listen=args.listen,
        delete_expired=args.delete_expired,
    )
    await controller.start()
    log.info(
        "devstack controller on %s:%d watching %s%s",
        *controller.address,
        ", ".join(args.namespace) if args.namespace else "all namespaces",
        " (deleting expired overrides)" if args.delete_expired else "",
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Not on the main thread (tests).
            loop.add_signal_handler(sig, stop.set)
    if on_started is not None:
        on_started(controller)
    assert controller.task is not None
    stopping = asyncio.create_task(stop.wait(), name="controller-stop")
    await asyncio.wait({stopping, controller.task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if controller.task.done() and not controller.task.cancelled() and controller.task.exception() is not None:
        log.error("kubernetes source failed: %s", controller.task.exception())
        code = 1
    stopping.cancel()
    await controller.close()
    return code
