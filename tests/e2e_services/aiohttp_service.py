"""The first hop: an aiohttp app with the SDK's middleware, calling the next hop with the SDK's
client session, which honours ``HTTP_PROXY`` (``trust_env=True``) as a pod's app would."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from propagation.aiohttp import client_session, middleware
from tests.e2e_services.common import DOWNSTREAM, REPORTED_HEADERS, inherited_socket, report

SESSION = web.AppKey("session", ClientSession)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def handle(request: web.Request) -> web.Response:
    downstream: Any = None
    if DOWNSTREAM:
        session = request.app[SESSION]
        try:
            async with session.get(DOWNSTREAM) as resp:
                downstream = (
                    await resp.json() if resp.status == 200 else {"status": resp.status, "text": await resp.text()}
                )
        except ClientError as exc:
            downstream = {"error": repr(exc)}
    inbound = {name: request.headers.getall(name, []) for name in REPORTED_HEADERS}
    return web.json_response(report(inbound, downstream))


async def session_context(app: web.Application) -> Any:
    async with client_session(trust_env=True, timeout=ClientTimeout(total=10)) as session:
        app[SESSION] = session
        yield


def main() -> None:
    app = web.Application(middlewares=[middleware])
    app.cleanup_ctx.append(session_context)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, sock=inherited_socket(), print=None, access_log=None)


if __name__ == "__main__":
    main()
