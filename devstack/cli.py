"""The ``devstack`` command: parses flags and composes router, controller sources and demo.

This is the one place where the router and the controller meet: it builds ``RouterSettings``
from flags, starts the configured sources, wires their snapshots through the ``Aggregator``
into the router's table slot, and installs signal handlers (SIGTERM/SIGINT drain and exit,
SIGHUP re-reads the route file). Nothing here runs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, Final

import router
from controller.aggregator import Aggregator
from controller.build import BuildError
from controller.sources.file import FileSource, load_route_file
from router.keys import DEFAULT_MEMBER
from router.server import RouterServer, parse_hostport
from router.settings import Limits, Mode, RouterSettings, Timeouts

log = logging.getLogger("devstack")

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN = "127.0.0.1:9901"


def _add_router_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--routes", metavar="FILE", help="YAML route file (re-read on change and on SIGHUP)")
    src.add_argument("--kubernetes", action="store_true", help="watch labelled Deployments (see README)")
    src.add_argument("--routes-from", metavar="URL", help="follow a devstack controller's /v1/routes feed")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"proxy listener host:port (default {DEFAULT_LISTEN})")
    p.add_argument("--admin", default=DEFAULT_ADMIN, help=f"admin listener host:port (default {DEFAULT_ADMIN})")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.INGRESS.value)
    p.add_argument(
        "--key-member",
        action="append",
        metavar="NAME",
        help=f"baggage member carrying the routing key; repeat for aliases (default {DEFAULT_MEMBER})",
    )
    p.add_argument("--namespace", action="append", default=[], help="with --kubernetes: namespace(s) to watch")
    p.add_argument(
        "--trust-forwarded", action="store_true", help="keep clients' X-Forwarded-Proto/Host and Forwarded"
    )
    p.add_argument(
        "--upgrade",
        action="append",
        metavar="TOKEN",
        help="an Upgrade protocol to tunnel besides websocket; repeatable (h2c never is)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="start a server span per request (OpenTelemetry SDK, configured by OTEL_* variables)",
    )
    t = Timeouts()
    p.add_argument("--header-timeout", type=float, default=t.header_read)
    p.add_argument("--keepalive-timeout", type=float, default=t.keepalive_idle)
    p.add_argument("--body-timeout", type=float, default=t.body_idle)
    p.add_argument("--connect-timeout", type=float, default=t.upstream_connect)
    p.add_argument("--upstream-timeout", type=float, default=t.upstream_response)
    p.add_argument("--drain-timeout", type=float, default=t.drain)
    p.add_argument(
        "--tunnel-idle-timeout",
        type=float,
        default=t.tunnel_idle,
        help=f"seconds a WebSocket tunnel may stay silent both ways before it is closed (default {t.tunnel_idle:g})",
    )
    lim = Limits()
    p.add_argument("--max-connections", type=int, default=lim.max_client_connections)
    p.add_argument("--max-body", type=int, default=lim.max_body_bytes, help="bytes, 0 = unlimited")
    p.add_argument(
        "--body-min-rate",
        type=int,
        default=lim.body_min_rate,
        help="bytes/s a request body must average after --body-timeout (408 below it; 0 = off; "
        f"default {lim.body_min_rate})",
    )
    p.add_argument("--pool-size", type=int, default=lim.upstream_pool_size)
    p.add_argument("--pool-queue", type=int, default=lim.upstream_pool_queue)
    p.add_argument("--max-header-bytes", type=int, default=lim.max_header_bytes)
    p.add_argument("--max-headers", type=int, default=lim.max_headers)
    p.add_argument("--log-level", default="INFO")


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    return RouterSettings(
        mode=Mode(args.mode),
        key_members=tuple(args.key_member or (DEFAULT_MEMBER,)),
        trust_forwarded=args.trust_forwarded,
        upgrade_protocols=frozenset({b"websocket", *(token.lower().encode() for token in args.upgrade or ())}),
        timeouts=Timeouts(
            header_read=args.header_timeout,
            keepalive_idle=args.keepalive_timeout,
            body_idle=args.body_timeout,
            upstream_connect=args.connect_timeout,
            upstream_response=args.upstream_timeout,
            drain=args.drain_timeout,
            tunnel_idle=args.tunnel_idle_timeout,
        ),
        limits=Limits(
            max_client_connections=args.max_connections,
            max_body_bytes=args.max_body,
            body_min_rate=args.body_min_rate,
            upstream_pool_size=args.pool_size,
            upstream_pool_queue=args.pool_queue,
            max_header_bytes=args.max_header_bytes,
            max_headers=args.max_headers,
        ),
    )


async def run_router(args: argparse.Namespace, *, started: asyncio.Event | None = None) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)  # a flag out of range (e.g. --upgrade h2c): say which, no traceback
        return 2
    server: RouterServer
    aggregator: Aggregator
    tasks: list[asyncio.Task[Any]] = []

    def readiness() -> tuple[bool, dict[str, Any]]:
        return (aggregator.ready and server.table.version > 0, {"errors": dict(aggregator.errors)})

    tracer = None
    if args.trace:
        from router.tracing import make_tracer_from_env  # noqa: PLC0415 - the SDK loads only when asked

        tracer = make_tracer_from_env()
    server = RouterServer(settings, readiness=readiness, tracer=tracer)
    if args.routes:
        aggregator = Aggregator(["file"], server.swap)
        source = FileSource(args.routes, aggregator.update, aggregator.report_error)
        if not source.load_once():
            log.error("%s", aggregator.errors.get("file"))
            return 2
        tasks.append(asyncio.create_task(source.run(), name="file-source"))
    else:
        sources = _external_sources(args)
        if sources is None:
            return 2
        aggregator = Aggregator([name for name, _ in sources], server.swap)
        for name, factory in sources:
            tasks.append(asyncio.create_task(factory(aggregator), name=f"{name}-source"))
    await server.start(parse_hostport(args.listen), parse_hostport(args.admin))
    log.info(
        "devstack router (%s mode) on %s:%d, admin on %s:%d, table v%d, hot path %s",
        settings.mode.value,
        *server.address,
        *server.admin_address,
        server.table.version,
        router.HOT_PATH_MODE,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.routes:
        loop.add_signal_handler(signal.SIGHUP, source.reload)
    if started is not None:
        started.set()
    await stop.wait()
    log.info("draining (up to %.0fs)", settings.timeouts.drain)
    for task in tasks:
        task.cancel()
    await server.close()
    return 0


def _external_sources(args: argparse.Namespace) -> list[tuple[str, Any]] | None:
    """Sources that live outside this module: Kubernetes and the remote controller feed."""
    try:
        if args.kubernetes:
            from controller.sources.kubernetes import kubernetes_source  # noqa: PLC0415 - optional

            return [("kubernetes", kubernetes_source(namespaces=args.namespace))]
        from controller.sources.remote import remote_source  # noqa: PLC0415 - optional

        return [("remote", remote_source(args.routes_from))]
    except ImportError as exc:
        log.error("source not available in this build: %s", exc)
        return None


def _check_routes(path: str) -> int:
    try:
        services = load_route_file(path)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: ok, {len(services)} services")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devstack", description="Baggage-routed overrides for shared environments.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_router_flags(sub.add_parser("router", help="run the routing proxy"))
    check = sub.add_parser("check", help="validate a route file and exit")
    check.add_argument("routes")
    demo = sub.add_parser("demo", help="router + demo services on loopback; prints what to try")
    demo.add_argument("--listen", default=DEFAULT_LISTEN)
    demo.add_argument("--admin", default=DEFAULT_ADMIN)
    ctl = sub.add_parser("controller", help="run the route controller (serves /v1/routes)")
    ctl.add_argument("--kubernetes", action="store_true", required=True)
    ctl.add_argument("--namespace", action="append", default=[])
    ctl.add_argument("--listen", default="127.0.0.1:9902")
    ctl.add_argument("--delete-expired", action="store_true")
    ctl.add_argument("--log-level", default="INFO")
    return parser


def _install_uvloop() -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional at import time for tooling
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed memory instead of handing it back to the kernel at once.

    Streaming allocates a read-sized bytes object per chunk (up to 256 KiB from uvloop). By
    default glibc maps blocks of 128 KiB and more fresh and trims the heap's free top, so every
    such chunk costs a page fault per 4 KiB: 15% of the router's CPU when relaying 1 MiB bodies.
    Holding up to 32 MiB of freed heap removes that. No-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    mallopt(_M_TRIM_THRESHOLD, 32 << 20)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "check":
        return _check_routes(args.routes)
    _install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "router":
            _keep_freed_memory()
            return asyncio.run(run_router(args))
        if args.command == "demo":
            from devstack_examples.demo import run_demo  # noqa: PLC0415 - the demo is optional

            return int(asyncio.run(run_demo(args)))
        if args.command == "controller":
            from controller.cli import run_controller  # noqa: PLC0415

            return int(asyncio.run(run_controller(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
