"""Configuration text for every process a benchmark starts: pure renderers, no I/O.

Each function turns ports and paths into the exact text a tool reads (nginx.conf, haproxy.cfg,
route YAML, wrk Lua), so the configurations can be read, diffed and unit-tested without starting
anything. This module must never write files or pick ports; ``run.py`` does both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

__all__ = [
    "BAGGAGE_ALICE",
    "BAGGAGE_REALISTIC",
    "BODY_FILE_BYTES",
    "ECHO_MODULE",
    "GRPC_CONTENT_TYPE",
    "GRPC_METHOD",
    "GRPC_REQUEST",
    "HOSTS",
    "KEYS",
    "SERVICE",
    "UPLOAD_BYTES",
    "Upstreams",
    "body_check_lua",
    "grpc_frame",
    "grpc_reply",
    "haproxy_proxy_cfg",
    "nginx_grpc_proxy_conf",
    "nginx_grpc_upstream_conf",
    "nginx_proxy_conf",
    "nginx_upstream_conf",
    "route_yaml",
    "route_yaml_large",
    "route_yaml_swap",
    "upload_lua",
]

SERVICE: Final = "bench"
HOSTS: Final = ("bench", "bench.local")
KEYS: Final = ("alice", "bob")
"""Routing keys with an override; every upstream answers ``/`` with its own name as the body."""
BAGGAGE_ALICE: Final = "devstack=alice"
BAGGAGE_REALISTIC: Final = (
    "userId=alice,devstack=alice;ttl=30,sessionId=abc123,isProduction=false,region=eu-west-1;p=1,tenant=acme"
)
"""Six members with properties: what a traced request from a real frontend carries."""
BODY_FILE_BYTES: Final = 1024 * 1024
UPLOAD_BYTES: Final = 64 * 1024 * 1024
ECHO_MODULE: Final = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
"""From libnginx-mod-http-echo (pulled in by nginx-light): ``echo_read_request_body`` makes the
upstream read an upload to the end before answering, so upload figures measure real transfer."""

GRPC_METHOD: Final = "/bench.Bench/Call"
"""The unary method every gRPC call invokes (the path of its HTTP/2 request)."""
GRPC_CONTENT_TYPE: Final = "application/grpc"


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _protobuf_string(field: int, value: str) -> bytes:
    """A protobuf message holding one short string field (wire type 2, length < 128)."""
    data = value.encode()
    if len(data) >= 128 or field >= 16:
        raise ValueError("only short strings in the first fifteen fields")
    return bytes([field << 3 | 2, len(data)]) + data


GRPC_REQUEST: Final = grpc_frame(_protobuf_string(1, "ping"))
"""The body of every benchmark call: one small message, as a generated client would send it."""


def grpc_reply(name: str) -> bytes:
    """The body the upstream ``name`` answers: one message whose field 1 is its name."""
    return grpc_frame(_protobuf_string(1, name))


_KEEPALIVE_REQUESTS: Final = 10_000_000
"""nginx closes a keep-alive connection after 1000 requests by default; reconnecting would be
measured as proxy cost, so every nginx here keeps connections for the whole run."""


@dataclasses.dataclass(frozen=True, slots=True)
class Upstreams:
    """Loopback ports of the upstream nginx: one per target, named like the body it serves."""

    baseline: int
    alice: int
    bob: int

    def port_for(self, key: str | None) -> int:
        return {"alice": self.alice, "bob": self.bob}.get(key or "", self.baseline)

    def by_name(self) -> Mapping[str, int]:
        return {"baseline": self.baseline, "alice": self.alice, "bob": self.bob}


def _nginx_common(workdir: str, name: str) -> str:
    return f"""worker_processes 1;
master_process off;
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 20000;
}}
"""


def _nginx_http_common(workdir: str, name: str) -> str:
    return f"""    access_log off;
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    fastcgi_temp_path {workdir}/{name}-fastcgi;
    uwsgi_temp_path {workdir}/{name}-uwsgi;
    scgi_temp_path {workdir}/{name}-scgi;
    keepalive_requests {_KEEPALIVE_REQUESTS};
    keepalive_timeout 120s;
    default_type text/plain;
"""


def nginx_upstream_conf(workdir: str, upstreams: Upstreams, docroot: str, *, echo_module: str | None) -> str:
    """One nginx worker serving the three targets: ``/`` (its name), ``/1m``, ``/upload``.

    Without the echo module ``/upload`` is left out (the upload scenario then cannot run): a bare
    ``return 200`` answers before the body has arrived, which would time the client's send
    buffer, not the transfer.
    """
    head = f"load_module {echo_module};\n" if echo_module else ""
    upload = (
        """        location = /upload {
            client_max_body_size 100m;
            client_body_buffer_size 80m;
            echo_read_request_body;
            echo ok;
        }
"""
        if echo_module
        else ""
    )
    servers = "".join(
        f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        sendfile on;
        location = / {{
            return 200 '{name}';
        }}
        location = /1m {{
            alias {docroot}/1m.bin;
        }}
{upload}    }}
"""
        for name, port in upstreams.by_name().items()
    )
    return (
        head
        + _nginx_common(workdir, "upstream")
        + "http {\n"
        + _nginx_http_common(workdir, "upstream")
        + servers
        + "}\n"
    )


def _nginx_quoted(payload: bytes) -> str:
    """``payload`` as the inside of a single-quoted nginx string, byte for byte.

    nginx keeps any byte of a quoted string, NUL included (a string has a length, not a
    terminator), so a binary gRPC frame can be written straight into the configuration; only
    the quote, the backslash and ``$`` would mean something else, and those are refused.
    """
    if not payload.isascii() or any(byte in payload for byte in b"'\\$"):
        raise ValueError(f"cannot write {payload!r} literally in an nginx string")
    return payload.decode("ascii")


def nginx_grpc_upstream_conf(workdir: str, upstreams: Upstreams, *, echo_module: str) -> str:
    """One nginx worker answering every gRPC call on three h2c (prior knowledge) ports.

    Each port answers like a gRPC server would: ``:status 200``, ``content-type:
    application/grpc``, one DATA frame with a length-prefixed message naming the target, then the
    trailer ``grpc-status: 0``; plus ``x-served-by: <target>`` so a check can see who answered.
    ``echo_read_request_body`` makes it read the whole request message first, as a server must
    before it can answer; a bare ``return 200`` would answer before the request's DATA frame and
    reset the stream (RST_STREAM NO_ERROR), a path real unary calls never take.
    """
    servers = "".join(
        f"""    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        location / {{
            default_type {GRPC_CONTENT_TYPE};
            add_header x-served-by {name} always;
            add_trailer grpc-status 0 always;
            echo_read_request_body;
            echo -n '{_nginx_quoted(grpc_reply(name))}';
        }}
    }}
"""
        for name, port in upstreams.by_name().items()
    )
    return (
        f"load_module {echo_module};\n"
        + _nginx_common(workdir, "grpc-upstream")
        + "http {\n"
        + _nginx_http_common(workdir, "grpc-upstream")
        + servers
        + "}\n"
    )


def _member_regex(key: str) -> str:
    """PCRE matching a whole baggage list whose ``devstack`` member (OWS allowed) is ``key``."""
    return rf"(^|,)\s*devstack\s*=\s*{key}\s*(;|,|$)"


def _nginx_routing(upstreams: Upstreams) -> str:
    """``map $http_baggage`` → ``$devstack_pool``, and one pool per target with keepalive 64."""
    mapping = "".join(f'        "~{_member_regex(key)}" {SERVICE}_{key};\n' for key in KEYS)
    pools = "".join(
        f"""    upstream {SERVICE}_{name} {{
        server 127.0.0.1:{p};
        keepalive 64;
        keepalive_requests {_KEEPALIVE_REQUESTS};
    }}
"""
        for name, p in upstreams.by_name().items()
    )
    return f"""    map $http_baggage $devstack_pool {{
        default {SERVICE}_baseline;
{mapping}    }}
{pools}"""


def nginx_proxy_conf(workdir: str, port: int, upstreams: Upstreams) -> str:
    """nginx doing the router's job: ``map $http_baggage`` picks the pool, keepalive 64 per pool.

    Request bodies stream (``proxy_request_buffering off``) as the router's do; responses are
    buffered in memory only (``proxy_max_temp_file_size 0``), never spilled to disk.
    """
    return (
        _nginx_common(workdir, "nginx-proxy")
        + "http {\n"
        + _nginx_http_common(workdir, "nginx-proxy")
        + _nginx_routing(upstreams)
        + f"""    server {{
        listen 127.0.0.1:{port} default_server backlog=4096;
        return 404;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name {" ".join(HOSTS)};
        client_max_body_size 0;
        location / {{
            proxy_pass http://$devstack_pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto http;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_request_buffering off;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
    )


def nginx_grpc_proxy_conf(workdir: str, port: int, upstreams: Upstreams) -> str:
    """nginx doing the router's job for gRPC: an h2c listener, the same ``map $http_baggage``
    and pools (keepalive 64 each), ``grpc_pass`` to the chosen one.

    nginx's gRPC proxy carries one stream per upstream connection (never multiplexes), so the
    pools' keep-alive connections are what spares it a connect per call.
    """
    return (
        _nginx_common(workdir, "nginx-grpc")
        + "http {\n"
        + _nginx_http_common(workdir, "nginx-grpc")
        + _nginx_routing(upstreams)
        + f"""    server {{
        listen 127.0.0.1:{port} http2 default_server backlog=4096;
        return 404;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        server_name {" ".join(HOSTS)};
        location / {{
            grpc_pass grpc://$devstack_pool;
            grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            grpc_set_header X-Forwarded-Proto http;
            grpc_set_header X-Forwarded-Host $http_host;
        }}
    }}
}}
"""
    )


def haproxy_proxy_cfg(port: int, upstreams: Upstreams, *, h2: bool = False) -> str:
    """haproxy doing the router's job: one thread, an ACL per key on the baggage values.

    ``req.hdr(baggage)`` yields each comma-separated member (of every baggage line), so an
    anchored regex per key matches the ``devstack`` member only. ``http-reuse always`` shares
    idle server connections between clients, like the router's and nginx's pools. ``h2``: HTTP/2
    with prior knowledge on both sides (``proto h2``), for gRPC; server connections then carry
    many streams at once.
    """
    proto = " proto h2" if h2 else ""
    hosts = " ".join(HOSTS)
    acls = "".join(
        f"    acl key_{key} req.hdr(baggage) -m reg '^\\s*devstack\\s*=\\s*{key}\\s*(;|$)'\n" for key in KEYS
    )
    uses = "".join(f"    use_backend {SERVICE}_{key} if key_{key}\n" for key in KEYS)
    backends = "".join(
        f"""backend {SERVICE}_{name}
    server s1 127.0.0.1:{p}{proto}
"""
        for name, p in upstreams.by_name().items()
    )
    return f"""global
    nbthread 1
    maxconn 8000

defaults
    mode http
    timeout connect 5s
    timeout client 75s
    timeout server 60s
    timeout http-keep-alive 75s
    timeout http-request 15s
    option http-keep-alive
    option forwardfor
    http-reuse always

frontend proxy
    bind 127.0.0.1:{port}{proto}
    acl known_host req.hdr(host),field(1,:) -i {hosts}
    http-request deny deny_status 404 if !known_host
{acls}{uses}    default_backend {SERVICE}_baseline

{backends}"""


def route_yaml(upstreams: Upstreams, *, extra_service: str | None = None, protocol: str | None = None) -> str:
    """The one-service route file; ``extra_service`` adds a dummy service (table swaps);
    ``protocol`` (``h2c`` for gRPC) says how the router speaks to the service's upstreams."""
    speaks = f"    protocol: {protocol}\n" if protocol else ""
    text = f"""services:
  {SERVICE}:
    hosts: [{", ".join(HOSTS)}]
{speaks}    baseline: http://127.0.0.1:{upstreams.baseline}
    overrides:
      alice: {{url: http://127.0.0.1:{upstreams.alice}}}
      bob: {{url: http://127.0.0.1:{upstreams.bob}}}
"""
    if extra_service:
        text += f"""  {extra_service}:
    hosts: [{extra_service}]
    baseline: http://127.0.0.1:{upstreams.baseline}
"""
    return text


def route_yaml_swap(upstreams: Upstreams, generation: int) -> str:
    """Two alternating tables that differ (so each swap publishes) but route ``bench`` alike."""
    return route_yaml(upstreams, extra_service="swap-a" if generation % 2 == 0 else "swap-b")


def route_yaml_large(upstreams: Upstreams, *, services: int, overrides_per_service: int, variant: int = 0) -> str:
    """``services`` services with ``overrides_per_service`` overrides each, ``bench`` among them.

    ``bench`` keeps its real alice and bob overrides (plus fillers up to the same count), so the
    timed requests route exactly as with the one-service table; every other target is an
    upstream port that exists, so nothing in the table is invalid. Odd ``variant``s move one
    filler override elsewhere: a table that differs (so a reload publishes) and routes bench alike.
    """
    fillers = [f"dev{i:02d}" for i in range(overrides_per_service)]
    lines = ["services:"]
    lines.append(f"  {SERVICE}:")
    lines.append(f"    hosts: [{', '.join(HOSTS)}]")
    lines.append(f"    baseline: http://127.0.0.1:{upstreams.baseline}")
    lines.append("    overrides:")
    lines.append(f"      alice: {{url: http://127.0.0.1:{upstreams.alice}}}")
    lines.append(f"      bob: {{url: http://127.0.0.1:{upstreams.bob}}}")
    lines.extend(
        f"      {key}: {{url: http://127.0.0.1:{upstreams.bob}}}" for key in fillers[: overrides_per_service - 2]
    )
    for i in range(services - 1):
        name = f"svc{i:05d}"
        lines.append(f"  {name}:")
        lines.append(f"    hosts: [{name}, {name}.local]")
        lines.append(f"    baseline: http://127.0.0.1:{upstreams.baseline}")
        lines.append("    overrides:")
        moved = variant % 2 == 1 and i == 0
        lines.extend(
            f"      {key}: {{url: http://127.0.0.1:{upstreams.bob if moved and j == 0 else upstreams.alice}}}"
            for j, key in enumerate(fillers)
        )
    return "\n".join(lines) + "\n"


def upload_lua(size: int = UPLOAD_BYTES) -> str:
    """wrk script: every request is a POST of ``size`` bytes to ``/upload``."""
    return f"""wrk.method = "POST"
wrk.path = "/upload"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.body = string.rep("x", {size})
"""


def body_check_lua(expected: str) -> str:
    """wrk script: count responses whose body is not ``expected``; printed as BODY_MISMATCHES."""
    return f"""local threads = {{}}
mismatches = 0

function setup(thread)
    table.insert(threads, thread)
end

function response(status, headers, body)
    if body ~= "{expected}" then
        mismatches = mismatches + 1
    end
end

function done(summary, latency, requests)
    local total = 0
    for _, thread in ipairs(threads) do
        total = total + thread:get("mismatches")
    end
    io.write(string.format("BODY_MISMATCHES %d\\n", total))
end
"""
