"""The ``devstack`` command: parses flags and composes router, controller sources and demo.

This is the one place where the router and the controller meet: it builds ``RouterSettings``
from flags, starts the configured sources, wires their snapshots through the ``Aggregator``
into the router's table slot, and installs signal handlers (SIGTERM/SIGINT drain and exit,
SIGHUP re-reads the route file). Each route source, admin listener and optional feature is
imported only when its flag asks for it, so a sidecar following a controller loads no YAML
parser, HTTP client library, metrics library or Kubernetes client. A mistake the user can fix
(a bad flag, a busy port, a route file that fails validation, a missing optional package) ends
the command with one line, ``devstack: <what>: <why>``, never a traceback. Nothing here runs
per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import gc
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

import router
from controller.aggregator import Aggregator
from controller.build import BuildError
from controller.startup import StartupError, parse_listen, start_router
from router.keys import DEFAULT_MEMBER
from router.scope import RouteScope
from router.settings import Limits, Mode, RouterSettings, Timeouts
from router.table import RouteTable

if TYPE_CHECKING:
    from controller.sources.file import FileSource
    from router.server import RouterServer
    from router.tracing import RequestTracer
    from router.workers import WorkerPool

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN = "127.0.0.1:9901"
DEFAULT_CONTROLLER_LISTEN = "127.0.0.1:9902"
DISTRIBUTIONS: Final = ("devstack-router", "devstack")
"""The package's distribution names, newest first (``devstack`` before the rename)."""
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
OTLP_EXTRA: Final = "pip install 'devstack-router[otlp]'"
KUBERNETES_EXTRA: Final = "pip install 'devstack-router[kubernetes]'"
ACCESS_LOG_NAMED: Final[dict[str, str | None]] = {"off": None, "stdout": "-"}
"""``--access-log`` words that are not file paths → ``RouterSettings.access_log``."""
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOOPS: Final = ("uvloop", "asyncio")
"""``router --loop``: uvloop by default; asyncio's own loop for a sidecar whose memory counts more
than its CPU per request (uvloop's module, libuv and its buffers are about 2.5 MiB resident)."""
FORK_TTL_DEFAULT: Final = "{controller.fork.DEFAULT_TTL}"
"""Stands for that value in ``fork --ttl``'s help until help is printed: ``controller.fork`` brings
the Kubernetes object builders (1.5 MiB resident), which no router or controller needs."""


def version() -> str:
    """The installed distribution's version, or ``unknown`` in a checkout that was never installed."""
    import importlib.metadata  # noqa: PLC0415 - 2 MiB of email and csv parsers, for --version only

    for name in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line; the full usage of ``router`` alone is forty lines."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _VersionAction(argparse.Action):
    """``--version``, reading the installed version only when asked (argparse's own wants it up front)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        sys.stdout.write(f"devstack {version()}\n")
        parser.exit()


class _HelpFormatter(argparse.HelpFormatter):
    """Ends each flag's help with its default, so no help text can forget or misstate it."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        # argparse would ask shutil for the width, and shutil loads bz2 and lzma (0.5 MiB resident)
        # for its archives: every command builds formatters, only --help prints one.
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if FORK_TTL_DEFAULT in text:
            from controller.fork import DEFAULT_TTL  # noqa: PLC0415 - see FORK_TTL_DEFAULT

            text = text.replace(FORK_TTL_DEFAULT, DEFAULT_TTL)
        default = action.default
        if "default" in text or default is argparse.SUPPRESS or default is None or default == []:
            return text
        if default is False and action.nargs == 0:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return os.get_terminal_size(stdout.fileno()).columns or 80 if stdout is not None else 80
    except (ValueError, OSError):
        return 80


def _host_port(value: str) -> str:
    try:
        parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _log_level(value: str) -> str:
    return value.upper()


def _worker_count(value: str) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on, not the host's
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number or auto")
    return int(value)


def _add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        type=_log_level,
        choices=LOG_LEVELS,
        default="INFO",
        help="least severe level logged, upper or lower case (DEBUG also shows each retry of a lost feed)",
    )


def _add_router_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--routes", metavar="FILE", help="YAML route file; re-read when it changes (polled every second) and on SIGHUP"
    )
    src.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch Deployments labelled devstack.io/service; see the README's Kubernetes section",
    )
    src.add_argument(
        "--routes-from",
        metavar="URL",
        help="follow a devstack controller's route feed (/v2/routes, or /v1 from an older controller), "
        "e.g. http://127.0.0.1:9902",
    )
    p.add_argument(
        "--services",
        metavar="NAMES",
        type=_name_list,
        default=None,
        help="with --routes-from: follow only these services (comma-separated service names or authorities, "
        "e.g. payments,ledger.shop.svc), so the table and feed traffic stay small",
    )
    p.add_argument(
        "--learn-services",
        action="store_true",
        help="with --routes-from: follow only the services this router has seen requests for (and --services); "
        "the first request for a new one waits for its routes, up to --first-use-wait",
    )
    p.add_argument(
        "--first-use-wait",
        metavar="SECONDS",
        type=float,
        default=2.0,
        help="with --learn-services: longest an HTTP/1.1 request (or CONNECT) waits for its service's routes "
        "before the usual no-route answer (default: %(default)s)",
    )
    p.add_argument("--listen", metavar="HOST:PORT", type=_host_port, default=DEFAULT_LISTEN, help="proxy listener")
    p.add_argument(
        "--admin",
        metavar="HOST:PORT",
        type=_host_port,
        default=DEFAULT_ADMIN,
        help="admin listener (/healthz, /readyz, /metrics, /routes)",
    )
    p.add_argument(
        "--admin-lite",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="an admin listener without aiohttp or prometheus_client (about 16 MiB less memory): /healthz, "
        "/readyz, /metrics as Prometheus text and /routes, no dashboard; default: on for --mode sidecar "
        "with --routes-from (the controller shows that table), off otherwise; never with --workers",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        type=_worker_count,
        default=1,
        help="proxy processes accepting on --listen together, for more than one core; auto: one per CPU this "
        "process may use. One parent still follows the route source and serves the admin listener",
    )
    p.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=Mode.INGRESS.value,
        help="ingress: a host no service claims gets 404; sidecar: 403 (the router is not an open proxy)",
    )
    p.add_argument(
        "--key-member",
        action="append",
        metavar="NAME",
        help="baggage member carrying the routing key; repeat for aliases, the first has precedence "
        f"(default: {DEFAULT_MEMBER})",
    )
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="with --kubernetes: a namespace to watch; repeatable (default: all namespaces)",
    )
    p.add_argument(
        "--trust-forwarded",
        action="store_true",
        help="keep clients' X-Forwarded-Proto/Host and Forwarded headers (only behind a trusted load balancer)",
    )
    p.add_argument(
        "--upgrade",
        action="append",
        metavar="TOKEN",
        help="another Upgrade protocol to tunnel; repeatable; h2c never is (default: websocket only)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="a server span per request with the OpenTelemetry SDK, configured by OTEL_* variables "
        f"(OTLP export needs {OTLP_EXTRA})",
    )
    p.add_argument(
        "--access-log",
        metavar="{off,stdout,PATH}",
        default="stdout",
        help="one line per exchange: nowhere, to standard output, or appended to a file",
    )
    p.add_argument(
        "--access-log-format",
        choices=("json", "text"),
        default="json",
        help="access log lines as JSON objects or as readable text",
    )
    p.add_argument(
        "--access-log-sample",
        metavar="N",
        type=int,
        default=1,
        help="log one successful exchange in N; answers of 400 and above are always logged",
    )
    p.add_argument(
        "--access-log-query",
        action="store_true",
        help="log request paths with their query strings (queries may carry tokens and personal data)",
    )
    tls = p.add_argument_group("TLS on the proxy listener (ingress; upstreams stay cleartext)")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate chain; re-read when it changes (cert-manager renewals), ALPN h2 and http/1.1",
    )
    tls.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    p.add_argument(
        "--http2-engine",
        choices=("h2", "nghttp2"),
        default=None,
        help="HTTP/2 protocol engine: nghttp2 (libnghttp2, the default where it loads) or h2 (pure Python, "
        "about 4x the CPU per stream)",
    )
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="uvloop",
        help="event loop: uvloop, or asyncio's own, for a small sidecar (2.5 MiB less memory, about 25%% more "
        "CPU per request)",
    )
    edge = p.add_argument_group('keys from browsers (ingress mode; see the README\'s "From a browser")')
    edge.add_argument(
        "--preview-domain",
        metavar="DOMAIN",
        help="KEY--SERVICE.DOMAIN names a service and a key (e.g. preview.example.com, or localhost)",
    )
    edge.add_argument("--key-header", action="store_true", help="honour the browser extension's x-devstack-key header")
    edge.add_argument(
        "--key-cookie",
        action="store_true",
        help="honour the devstack-key cookie, set by visiting any routed URL with ?devstack=KEY",
    )
    edge.add_argument("--key-cookie-domain", metavar="DOMAIN", help="Domain of that cookie (default: host-only)")
    edge.add_argument(
        "--key-cookie-max-age", type=int, default=8 * 3600, metavar="SECONDS", help="lifetime of that cookie"
    )
    edge.add_argument(
        "--edge-key-clients",
        action="append",
        default=[],
        metavar="CIDR",
        help="only clients in these networks may choose a key at the edge; repeatable (default: every client)",
    )
    t = Timeouts()
    p.add_argument(
        "--header-timeout",
        metavar="SECONDS",
        type=float,
        default=t.header_read,
        help="a client must send a whole request head within this (slowloris guard; 408)",
    )
    p.add_argument(
        "--keepalive-timeout",
        metavar="SECONDS",
        type=float,
        default=t.keepalive_idle,
        help="idle client keep-alive connections are closed after this",
    )
    p.add_argument(
        "--body-timeout",
        metavar="SECONDS",
        type=float,
        default=t.body_idle,
        help="longest pause while a client sends a request body (408); also the grace before --body-min-rate",
    )
    p.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        type=float,
        default=t.upstream_connect,
        help="upstream TCP connect timeout (504)",
    )
    p.add_argument(
        "--upstream-timeout",
        metavar="SECONDS",
        type=float,
        default=t.upstream_response,
        help="longest upstream silence, before the response head or between body reads (504)",
    )
    p.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        type=float,
        default=t.drain,
        help="on SIGTERM, in-flight exchanges get this long to finish",
    )
    p.add_argument(
        "--tunnel-idle-timeout",
        metavar="SECONDS",
        type=float,
        default=t.tunnel_idle,
        help="a WebSocket tunnel silent both ways for this long is closed",
    )
    lim = Limits()
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=lim.max_client_connections,
        help="client connections beyond this are closed at once",
    )
    p.add_argument(
        "--max-body",
        metavar="BYTES",
        type=int,
        default=lim.max_body_bytes,
        help="request bodies larger than this get 413; 0 = unlimited",
    )
    p.add_argument(
        "--body-min-rate",
        metavar="BYTES_PER_S",
        type=int,
        default=lim.body_min_rate,
        help="average rate a request body must keep once --body-timeout has passed (408 below it); 0 = off",
    )
    p.add_argument(
        "--pool-size",
        metavar="N",
        type=int,
        default=lim.upstream_pool_size,
        help="connections per upstream address, in use plus idle",
    )
    p.add_argument(
        "--pool-queue",
        metavar="N",
        type=int,
        default=lim.upstream_pool_queue,
        help="requests that may wait for a pooled connection; beyond it 503 pool-full",
    )
    p.add_argument(
        "--max-header-bytes",
        metavar="BYTES",
        type=int,
        default=lim.max_header_bytes,
        help="all request header lines together (431); must stay above the 8192-byte W3C baggage",
    )
    p.add_argument(
        "--max-headers",
        metavar="N",
        type=int,
        default=lim.max_headers,
        help="request header lines (431)",
    )
    _add_log_level(p)


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    return RouterSettings(
        mode=Mode(args.mode),
        key_members=tuple(args.key_member or (DEFAULT_MEMBER,)),
        trust_forwarded=args.trust_forwarded,
        upgrade_protocols=frozenset({b"websocket", *(token.lower().encode() for token in args.upgrade or ())}),
        access_log=ACCESS_LOG_NAMED.get(args.access_log, args.access_log),
        access_log_format=args.access_log_format,
        access_log_sample=args.access_log_sample,
        access_log_query=args.access_log_query,
        preview_domain=args.preview_domain,
        key_header=args.key_header,
        key_cookie=args.key_cookie,
        key_cookie_domain=args.key_cookie_domain,
        key_cookie_max_age=args.key_cookie_max_age,
        edge_key_clients=tuple(args.edge_key_clients),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        http2_engine=args.http2_engine,
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


def _otlp_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp") is not None
    except ModuleNotFoundError:  # not even the opentelemetry.exporter namespace
        return False


def _make_tracer() -> RequestTracer | None:
    """The ``--trace`` tracer; an exporter that cannot be made is a start-up error naming the fix."""
    try:
        from router.tracing import make_tracer_from_env  # noqa: PLC0415 - the SDK loads only when asked

        return make_tracer_from_env()
    except (ImportError, ValueError) as exc:
        hint = "" if _otlp_installed() else f"; install the OTLP exporter: {OTLP_EXTRA}"
        raise StartupError(f"--trace: {exc}{hint}") from None


async def run_router(args: argparse.Namespace, *, started: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT; raises ``StartupError`` for anything the user must fix first."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:  # a flag out of range (e.g. --upgrade h2c): the message names it
        raise StartupError(str(exc)) from None
    lite = _admin_lite(args)
    scope = _route_scope(args)
    tracer = _make_tracer() if args.trace else None
    server: RouterServer | WorkerPool
    aggregator: Aggregator
    file_source: FileSource | None = None
    sources: list[tuple[str, Any]] = []

    def readiness() -> tuple[bool, dict[str, Any]]:
        return (aggregator.ready and server.table.version > 0, {"errors": dict(aggregator.errors)})

    if args.workers > 1:
        from router.workers import WorkerPool  # noqa: PLC0415 - aiohttp and prometheus_client: see the docstring

        if tracer is not None:
            tracer.shutdown()  # made only to report a bad configuration here: each worker makes its own
        server = WorkerPool(
            settings,
            workers=args.workers,
            decode=_table_from_json,
            decode_delta=_table_after_delta,
            readiness=readiness,
            prepare=functools.partial(_prepare_router_worker, args.log_level, args.loop),
            trace=tracer is not None,
        )
    else:
        from router.server import RouterServer  # noqa: PLC0415 - as WorkerPool above

        server = RouterServer(settings, readiness=readiness, tracer=tracer, admin_lite=lite)
        server.slot.scope = scope
    publish = server.swap
    if lite:
        publish = functools.partial(_swap_then_release, server.swap, asyncio.get_running_loop())
    if args.routes:
        from controller.sources.file import FileSource  # noqa: PLC0415 - the YAML parser, for --routes only

        aggregator = Aggregator([FileSource.name], publish)
        file_source = FileSource(args.routes, aggregator.update, aggregator.report_error)
        try:
            file_source.load_first()  # the validation `devstack check` runs; no table, no router
        except BuildError as exc:
            raise StartupError(str(exc)) from None
    else:
        sources = _external_sources(args, scope)
        aggregator = Aggregator([name for name, _ in sources], publish)
    # The admin listener's route-source metrics read the aggregator's own counts.
    server.stats.table_failures = aggregator.failures
    server.stats.source_confirmed = aggregator.confirmed
    access_log = None if settings.access_log is None else args.access_log
    await start_router(server, args.listen, args.admin, access_log=access_log)
    tasks: list[asyncio.Task[Any]] = []
    if file_source is not None:
        tasks.append(asyncio.create_task(file_source.run(), name="file-source"))
    for name, factory in sources:
        tasks.append(asyncio.create_task(factory(aggregator), name=f"{name}-source"))
    log.info(
        "devstack router (%s mode) on %s:%d, admin%s on %s:%d, table v%d, hot path %s%s",
        settings.mode.value,
        *server.address,
        " (lite)" if lite else "",
        *server.admin_address,
        server.table.version,
        router.HOT_PATH_MODE,
        f", {args.workers} workers" if args.workers > 1 else "",
    )
    # What start-up made (modules, the first table) lives as long as the process: set it aside from
    # the cyclic GC, whose full passes would otherwise walk it again and again under load (about 4%
    # less CPU per gRPC stream, measured).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if file_source is not None:
        loop.add_signal_handler(signal.SIGHUP, file_source.reload)
    if started is not None:
        started.set()
    await stop.wait()
    log.info("draining (up to %.0fs)", settings.timeouts.drain)
    for task in tasks:
        task.cancel()
    await server.close()
    return 0


def _admin_lite(args: argparse.Namespace) -> bool:
    """Whether ``--admin-lite`` applies: asked for, or by default a sidecar following a controller.

    Such a sidecar is the one deployed by the hundred, so its memory counts most, and the
    controller it follows already serves the dashboard of the same table. The worker pool's
    admin adds up its workers' counters over aiohttp, so ``--workers`` keeps the full one."""
    if args.admin_lite is None:
        return args.mode == Mode.SIDECAR.value and args.routes_from is not None and args.workers == 1
    if args.admin_lite and args.workers > 1:
        raise StartupError("--admin-lite: not with --workers; their admin listener is the full one")
    return bool(args.admin_lite)


def _table_from_json(document: Any) -> RouteTable:
    """A ``--workers`` process's copy of its parent's table (``RouteTable.to_json``), read back
    by the remote feed's validator."""
    from controller.sources.remote import routes_from_json  # noqa: PLC0415 - as in _external_sources

    version, services = routes_from_json(document)
    return RouteTable(services, version, tuple(document.get("sources", ())))


def _table_after_delta(table: RouteTable, groups: Mapping[str, object], delta: dict[str, Any]) -> RouteTable:
    """A ``--workers`` process's next table: its parent's delta (the /v2 feed's shape) applied to
    ``table`` by the remote feed's ``apply_delta``, which builds only the services it sets."""
    from controller.sources.remote import apply_delta  # noqa: PLC0415 - as in _external_sources

    return apply_delta(table, groups, delta)[0]


def _prepare_router_worker(log_level: str, loop: str) -> None:
    """A ``--workers`` process, set up as ``main`` sets up the router's own."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    if loop == "uvloop":
        _install_uvloop()
    _keep_freed_memory()


def _name_list(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one service")
    return names


def _route_scope(args: argparse.Namespace) -> RouteScope | None:
    """``--services``/``--learn-services``: the names a scoped sidecar follows (None: every service)."""
    if args.services is None and not args.learn_services:
        return None
    if args.routes_from is None:
        raise StartupError("--services and --learn-services: only with --routes-from (the controller scopes its feed)")
    if args.learn_services and args.workers > 1:
        raise StartupError("--learn-services: not with --workers (the workers' requests cannot hold for the parent)")
    if args.first_use_wait <= 0:
        raise StartupError("--first-use-wait: must be positive")
    return RouteScope(args.services or (), learn=args.learn_services, wait=args.first_use_wait)


def _external_sources(args: argparse.Namespace, scope: RouteScope | None = None) -> list[tuple[str, Any]]:
    """Sources that live outside this module: Kubernetes and the remote controller feed."""
    if args.kubernetes:
        try:
            from controller.sources.kubernetes import kubernetes_source  # noqa: PLC0415 - optional
        except ImportError as exc:
            raise StartupError(f"--kubernetes needs the Kubernetes client ({exc.name}): {KUBERNETES_EXTRA}") from None
        return [("kubernetes", kubernetes_source(namespaces=args.namespace))]
    from controller.sources.remote import remote_source  # noqa: PLC0415 - as the file source in run_router

    try:
        return [("remote", remote_source(args.routes_from, scope=scope))]
    except ValueError as exc:
        raise StartupError(f"--routes-from: {exc}") from None


def _check_routes(path: str) -> int:
    """``devstack check``: the router's own validation of a route file (``load_route_file``)."""
    from controller.sources.file import load_route_file  # noqa: PLC0415 - see run_router

    try:
        services = load_route_file(path)
    except BuildError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: ok, {len(services)} services")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="devstack",
        description="Baggage-routed overrides for shared environments.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    _add_router_flags(command("router", "run the routing proxy"))
    check = command("check", "validate a route file as the router would, and exit (1 and file:line on error)")
    check.add_argument("routes", metavar="FILE", help="the YAML route file to validate")
    demo = command("demo", "router + demo services on loopback; prints what to try")
    demo.add_argument("--listen", metavar="HOST:PORT", type=_host_port, default=DEFAULT_LISTEN, help="proxy listener")
    demo.add_argument("--admin", metavar="HOST:PORT", type=_host_port, default=DEFAULT_ADMIN, help="admin listener")
    _add_log_level(demo)
    ctl = command("controller", "run the route controller (serves /v1/routes for routers to follow)")
    src = ctl.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--routes",
        metavar="FILE",
        help="serve this YAML route file; re-read when it changes (polled every second) and on SIGHUP",
    )
    src.add_argument("--kubernetes", action="store_true", help="watch Deployments labelled devstack.io/service")
    ctl.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="with --kubernetes: a namespace to watch; repeatable (default: all namespaces)",
    )
    ctl.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_host_port,
        default=DEFAULT_CONTROLLER_LISTEN,
        help="listener for /v1/routes, /healthz, /readyz and /metrics",
    )
    ctl.add_argument(
        "--delete-expired",
        action="store_true",
        help="with --kubernetes: delete override Deployments past their TTL (needs delete RBAC)",
    )
    _add_log_level(ctl)
    _add_override_commands(command)
    return parser


OVERRIDE_COMMANDS: Final = ("fork", "ls", "rm", "extend", "group")
"""Commands that write or read overrides and route groups on a cluster from a developer's shell
(controller/override_cli.py, controller/group_cli.py)."""


def _add_kube_flags(p: argparse.ArgumentParser, namespace_help: str) -> None:
    """How every override command finds its cluster, as kubectl does."""
    p.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else the pod's service account)",
    )
    p.add_argument("--context", metavar="NAME", help="kubeconfig context to use (default: its current-context)")
    p.add_argument("-n", "--namespace", metavar="NS", help=namespace_help)


def _add_override_commands(command: Any) -> None:
    fork = command(
        "fork",
        "copy SERVICE's baseline into an override for --key, with your image: Deployment SERVICE-KEY and its Service",
    )
    fork.add_argument("service", metavar="SERVICE", help="the service (devstack.io/service label of its baseline)")
    fork.add_argument("--key", required=True, help="the routing key (a DNS-1123 label, e.g. alice)")
    fork.add_argument("--image", metavar="IMAGE", help="image of the main container (default: the baseline's)")
    fork.add_argument(
        "--container",
        action="append",
        default=[],
        metavar="NAME=IMAGE",
        help="image of the container NAME; repeatable",
    )
    fork.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a variable of the main container; repeatable",
    )
    fork.add_argument(
        "--ttl",
        metavar="DURATION",
        help="the override expires this long from now, e.g. 30m, 8h, 1h30m "
        f"(default: the baseline's devstack.io/ttl annotation, else {FORK_TTL_DEFAULT})",
    )
    _add_kube_flags(fork, "namespace of the override (default: the baseline's)")
    fork.add_argument("--replicas", metavar="N", type=int, default=1, help="pods of the override")
    fork.add_argument(
        "--fallback",
        choices=("error", "baseline"),
        help="while it is not ready or expired, the key gets a 503 or the baseline (default: error)",
    )
    fork.add_argument(
        "--dry-run",
        action="store_true",
        help="print the YAML it would apply, sending nothing (it still reads the baseline)",
    )
    fork.add_argument(
        "--wait", action=argparse.BooleanOptionalAction, default=True, help="wait until the override's rollout is ready"
    )
    fork.add_argument("--timeout", metavar="DURATION", default="5m", help="with --wait: give up after this long")
    fork.add_argument(
        "--replace", action="store_true", help="update the override if it exists (taking over its fields)"
    )
    fork.add_argument(
        "--ingress",
        metavar="URL",
        help="your ingress router, for the curl line printed at the end (default: $DEVSTACK_INGRESS)",
    )
    fork.add_argument(
        "--preview-domain",
        metavar="DOMAIN",
        help="the ingress's --preview-domain, for the preview URL (default: $DEVSTACK_PREVIEW_DOMAIN)",
    )
    fork.add_argument("--dashboard", metavar="URL", help="the dashboard, for its link (default: $DEVSTACK_DASHBOARD)")

    ls = command("ls", "list overrides: service, key, ready replicas, expiry, age, namespace, leaks and conflicts")
    ls.add_argument("--key", help="only overrides for this key (default: every key)")
    ls.add_argument("--service", metavar="S", help="only overrides of this service (default: every service)")
    ls.add_argument(
        "-o", "--output", choices=("wide", "json", "yaml"), help="more columns, or JSON or YAML (default: a table)"
    )
    _add_kube_flags(ls, "only this namespace (default: all namespaces)")

    rm = command(
        "rm", "delete SERVICE's override for --key (Deployment and Service), or with no SERVICE every one of that key"
    )
    rm.add_argument(
        "service", metavar="SERVICE", nargs="?", help="the service (default: every service, after a confirmation)"
    )
    rm.add_argument("--key", required=True, help="the routing key")
    rm.add_argument("-y", "--yes", action="store_true", help="delete every override of the key without asking")
    _add_kube_flags(rm, "only this namespace (default: all namespaces)")

    extend = command("extend", "make the overrides of --key (of SERVICE if given) expire --ttl from now")
    extend.add_argument("service", metavar="SERVICE", nargs="?", help="the service (default: every service)")
    extend.add_argument("--key", required=True, help="the routing key")
    extend.add_argument("--ttl", required=True, metavar="DURATION", help="new time left, e.g. 4h or 1h30m")
    _add_kube_flags(extend, "only this namespace (default: all namespaces)")

    group: argparse.ArgumentParser = command(
        "group", "route groups: one key that reaches, per service, the override of the first of its keys that has one"
    )
    actions = group.add_subparsers(dest="group_command", required=True, metavar="ACTION")

    def action(name: str, text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    create = action(
        "create", "declare route group NAME with its keys, first choice first (ConfigMap devstack-group-NAME)"
    )
    create.add_argument("name", metavar="NAME", help="the group's name, sent as the key: devstack=NAME")
    create.add_argument("keys", metavar="KEY", nargs="+", help="its keys (DNS-1123 labels), first choice first")
    create.add_argument(
        "--replace", action="store_true", help="change the keys of an existing group (taking over their fields)"
    )
    _add_kube_flags(create, "namespace of the ConfigMap (default: the kubeconfig context's, else default)")
    group_ls = action("ls", "list route groups: keys, ConfigMap, age, and conflicts, clashes with keys and nesting")
    group_ls.add_argument(
        "-o",
        "--output",
        choices=("wide", "json", "yaml"),
        help="also the member each service routes the group to, or JSON or YAML (default: a table)",
    )
    _add_kube_flags(group_ls, "only this namespace (default: all namespaces)")
    group_rm = action("rm", "delete route group NAME (the ConfigMaps that declare it), after a confirmation")
    group_rm.add_argument("name", metavar="NAME", help="the group's name")
    group_rm.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    _add_kube_flags(group_rm, "only this namespace (default: all namespaces)")


def _run_override_command(args: argparse.Namespace) -> int:
    """``devstack fork|ls|rm|extend|group``: synchronous, so it runs with no event loop (and no uvloop)."""
    try:
        # Both need the optional Kubernetes client.
        if args.command == "group":
            from controller.group_cli import run  # noqa: PLC0415
        else:
            from controller.override_cli import run  # noqa: PLC0415
    except ImportError as exc:
        print(f"devstack: {args.command} needs the Kubernetes client ({exc.name}): {KUBERNETES_EXTRA}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except StartupError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "controller" and args.routes and (args.namespace or args.delete_expired):
        flag = "--namespace" if args.namespace else "--delete-expired"
        parser.exit(2, f"devstack controller: {flag} applies to --kubernetes only, not --routes\n")
    return args


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


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's ``malloc_trim``); no-op elsewhere."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim(0)


def _swap_then_release(swap: Callable[[RouteTable], None], loop: asyncio.AbstractEventLoop, table: RouteTable) -> None:
    """A lite sidecar's table swap. Start-up's garbage, a feed line's JSON and the table it replaces
    are the most such a router frees, and ``_keep_freed_memory`` would keep them resident (1.5 MiB
    after start-up, more for a big table). Released on the next loop turn, once the source that
    published has dropped its parse; a table changes seldom, so streaming soon regrows its cache."""
    swap(table)
    loop.call_soon(_release_freed_memory)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format=LOG_FORMAT,
    )
    if args.command == "check":
        return _check_routes(args.routes)
    if args.command in OVERRIDE_COMMANDS:
        return _run_override_command(args)
    if args.command != "router" or args.loop == "uvloop":
        _install_uvloop()  # else asyncio's own loop, and uvloop is never imported
    try:
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
    except StartupError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
