"""The second hop: a plain WSGI app wrapped in the SDK's middleware, served by the standard
library's wsgiref (threaded), calling the next hop with urllib, which sends it to the sidecar named
by ``HTTP_PROXY``; the SDK's ``inject`` writes the propagation headers."""

from __future__ import annotations

import json
import signal
import socketserver
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIEnvironment

from propagation import inject
from propagation.wsgi import PropagationMiddleware
from tests.e2e_services.common import DOWNSTREAM, REPORTED_HEADERS, inherited_socket, report


def call_downstream() -> Any:
    headers: dict[str, str] = {}
    request = urllib.request.Request(DOWNSTREAM, headers=inject(headers))
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "text": exc.read().decode("utf-8", "replace")}
    except OSError as exc:
        return {"error": repr(exc)}


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    downstream = call_downstream() if DOWNSTREAM else None
    # The server has already combined repeated lines into one (PEP 3333).
    inbound = {}
    for name in REPORTED_HEADERS:
        value = environ.get("HTTP_" + name.upper().replace("-", "_"))
        inbound[name] = [] if value is None else [value]
    body = json.dumps(report(inbound, downstream)).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main() -> None:
    sock = inherited_socket()
    server = ThreadingWSGIServer(sock.getsockname(), QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name, server.server_port = sock.getsockname()[:2]
    server.setup_environ()
    server.set_app(PropagationMiddleware(app))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
