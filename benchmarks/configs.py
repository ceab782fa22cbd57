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
    "HOSTS",
    "KEYS",
    "SERVICE",
    "UPLOAD_BYTES",
    "Upstreams",
    "body_check_lua",
    "haproxy_proxy_cfg",
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


def _member_regex(key: str) -> str:
    """PCRE matching a whole baggage list whose ``devstack`` member (OWS allowed) is ``key``."""
    return rf"(^|,)\s*devstack\s*=\s*{key}\s*(;|,|$)"


def nginx_proxy_conf(workdir: str, port: int, upstreams: Upstreams) -> str:
    """nginx doing the router's job: ``map $http_baggage`` picks the pool, keepalive 64 per pool.

    Request bodies stream (``proxy_request_buffering off``) as the router's do; responses are
    buffered in memory only (``proxy_max_temp_file_size 0``), never spilled to disk.
    """
    pools = "".join(
        f"""    upstream {SERVICE}_{name} {{
        server 127.0.0.1:{p};
        keepalive 64;
        keepalive_requests {_KEEPALIVE_REQUESTS};
    }}
"""
        for name, p in upstreams.by_name().items()
    )
    mapping = "".join(f'        "~{_member_regex(key)}" {SERVICE}_{key};\n' for key in KEYS)
    return (
        _nginx_common(workdir, "nginx-proxy")
        + "http {\n"
        + _nginx_http_common(workdir, "nginx-proxy")
        + f"""    map $http_baggage $devstack_pool {{
        default {SERVICE}_baseline;
{mapping}    }}
{pools}    server {{
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


def haproxy_proxy_cfg(port: int, upstreams: Upstreams) -> str:
    """haproxy doing the router's job: one thread, an ACL per key on the baggage values.

    ``req.hdr(baggage)`` yields each comma-separated member (of every baggage line), so an
    anchored regex per key matches the ``devstack`` member only. ``http-reuse always`` shares
    idle server connections between clients, like the router's and nginx's pools.
    """
    hosts = " ".join(HOSTS)
    acls = "".join(
        f"    acl key_{key} req.hdr(baggage) -m reg '^\\s*devstack\\s*=\\s*{key}\\s*(;|$)'\n" for key in KEYS
    )
    uses = "".join(f"    use_backend {SERVICE}_{key} if key_{key}\n" for key in KEYS)
    backends = "".join(
        f"""backend {SERVICE}_{name}
    server s1 127.0.0.1:{p}
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
    bind 127.0.0.1:{port}
    acl known_host req.hdr(host),field(1,:) -i {hosts}
    http-request deny deny_status 404 if !known_host
{acls}{uses}    default_backend {SERVICE}_baseline

{backends}"""


def route_yaml(upstreams: Upstreams, *, extra_service: str | None = None) -> str:
    """The one-service route file; ``extra_service`` adds a dummy service (table swaps)."""
    text = f"""services:
  {SERVICE}:
    hosts: [{", ".join(HOSTS)}]
    baseline: http://127.0.0.1:{upstreams.baseline}
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
