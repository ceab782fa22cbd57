"""The last hop: a pure ASGI app wrapped in the SDK's middleware, served by uvicorn. It calls no
service; instead it publishes a message whose headers the SDK's ``inject`` fills, as a handler
putting work on a queue would, and returns that message so the test can hand it to the workers."""

from __future__ import annotations

import json
from typing import Any

import uvicorn

from propagation import inject
from propagation.asgi import PropagationMiddleware, Receive, Scope, Send
from tests.e2e_services.common import REPORTED_HEADERS, SERVICE, VERSION, inherited_socket, report


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/healthz":
        payload: Any = "ok"
    else:
        inbound: dict[str, list[str]] = {name: [] for name in REPORTED_HEADERS}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            if name in inbound:
                inbound[name].append(raw_value.decode("latin-1"))
        payload = report(inbound)
        message_headers: dict[str, str] = {}
        payload["published"] = {
            "headers": inject(message_headers),
            "body": {"event": "charged", "by": f"{SERVICE} [{VERSION}]"},
        }
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    config = uvicorn.Config(PropagationMiddleware(app), lifespan="off", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[inherited_socket()])


if __name__ == "__main__":
    main()
