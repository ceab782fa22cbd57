"""A small headless-Chromium driver over the raw DevTools protocol (CDP), for tests.

No Selenium, no Playwright: Chromium is started with ``--remote-debugging-port=0``, the
browser-level websocket URL is read from its stderr (``DevTools listening on ws://...``), and
commands go over that one websocket (aiohttp's client) with flattened sessions, so one
connection drives every page, worker and extension target.

    async with Browser.launch() as browser:
        page = await browser.new_page()
        await page.navigate("http://127.0.0.1:9901/")
        assert await page.evaluate("document.title")
        await page.screenshot(path)

Extra command-line arguments (``--load-extension=DIR``, ...) go to ``launch(args=...)``;
``targets()`` lists pages, service workers and extension backgrounds, ``wait_for_target()`` waits
for one, and ``attach()`` drives any of them (Debian's Chromium 156 loads an unpacked MV3 extension
with ``--load-extension`` under ``--headless=new``; its service worker appears as a target, and its
``chrome.*`` bindings a moment later: ``wait_for("!!globalThis.chrome?.runtime")`` first).
``chromium_binary()`` finds the browser (``$CHROMIUM`` first), or None: tests skip then.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import re
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["Browser", "BrowserError", "Session", "chromium_binary", "png_size"]

DEFAULT_ARGS: tuple[str, ...] = (
    "--headless=new",
    "--no-sandbox",  # containers and CI users rarely have the user namespaces the sandbox needs
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--window-size=1440,900",
)
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    """Chromium did not start, a command failed, or a wait ran out; the message says which."""


def chromium_binary() -> str | None:
    """``$CHROMIUM``, else the first of chromium, chromium-browser, google-chrome on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; raises ValueError if ``data`` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class Session:
    """One attached target (a page, a worker, an extension's background): CDP commands and events."""

    def __init__(self, browser: Browser, session_id: str, target_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.target_id = target_id

    async def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Run a CDP command on this target and return its result."""
        return await self.browser.send(method, timeout=timeout, session_id=self.session_id, **params)

    def expect(self, method: str, predicate: Callable[[dict[str, Any]], bool] | None = None) -> asyncio.Future[Any]:
        """A future for this target's next ``method`` event (subscribe before causing it)."""
        return self.browser.expect(method, self.session_id, predicate)

    async def navigate(self, url: str, timeout: float = 30.0) -> None:
        """Load ``url`` and wait for its load event."""
        await self.send("Page.enable")
        loaded = self.expect("Page.loadEventFired")
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            loaded.cancel()
            raise BrowserError(f"navigate {url}: {result['errorText']}")
        try:
            await asyncio.wait_for(loaded, timeout)
        except TimeoutError:
            raise BrowserError(f"navigate {url}: no load event within {timeout}s") from None

    async def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression (promises awaited), or BrowserError if it throws."""
        result = await self.send(
            "Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"evaluate {expression!r}: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy and return its value; BrowserError after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() >= deadline:
                raise BrowserError(f"wait_for {expression!r}: still {value!r} after {timeout}s")
            await asyncio.sleep(interval)

    async def screenshot(self, path: str | os.PathLike[str] | None = None, full_page: bool = True) -> bytes:
        """A PNG of the viewport, or of the whole page (beyond the viewport) with ``full_page``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            width, height = int(size["width"]), int(size["height"])
            params.update(
                captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
            )
        result = await self.send("Page.captureScreenshot", timeout=60.0, **params)
        data = base64.b64decode(result["data"])
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)
        return data

    async def close(self) -> None:
        """Close this target (a page's tab); detached sessions of other kinds just end."""
        with contextlib.suppress(BrowserError):
            await self.browser.send("Target.closeTarget", targetId=self.target_id)


class Browser:
    """A running Chromium and its browser-level DevTools connection."""

    def __init__(self, process: asyncio.subprocess.Process, profile: tempfile.TemporaryDirectory[str]) -> None:
        self.process = process
        self._profile = profile
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, str | None, Callable[[dict[str, Any]], bool] | None, asyncio.Future[Any]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self.stderr_tail: deque[str] = deque(maxlen=50)
        """Chromium's last stderr lines, for failure messages."""

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, args: Sequence[str] = (), binary: str | None = None, timeout: float = 30.0
    ) -> AsyncIterator[Browser]:
        """Start Chromium (``DEFAULT_ARGS`` plus ``args``) and connect; closed when the block ends."""
        path = binary or chromium_binary()
        if path is None:
            raise BrowserError("no Chromium binary (install the chromium package or set $CHROMIUM)")
        profile = tempfile.TemporaryDirectory(prefix="devstack-chromium-", ignore_cleanup_errors=True)
        process = await asyncio.create_subprocess_exec(
            path,
            *DEFAULT_ARGS,
            "--remote-debugging-port=0",
            f"--user-data-dir={profile.name}",
            *args,
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        browser = cls(process, profile)
        try:
            await browser._connect(timeout)
            yield browser
        finally:
            await browser.close()

    async def _connect(self, timeout: float) -> None:
        assert self.process.stderr is not None
        stderr = self.process.stderr
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        url = None
        while url is None:
            try:
                line = await asyncio.wait_for(stderr.readline(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BrowserError(f"Chromium printed no DevTools URL within {timeout}s: {self._tail()}") from None
            if not line:
                raise BrowserError(f"Chromium exited ({await self.process.wait()}): {self._tail()}")
            self.stderr_tail.append(line.decode(errors="replace").rstrip())
            found = _LISTENING.search(line)
            url = found.group(1).decode() if found else None
        # Keep reading stderr, or Chromium blocks once the pipe's buffer is full.
        self._stderr_task = asyncio.create_task(self._drain_stderr(stderr))
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        self._reader = asyncio.create_task(self._read())

    def _tail(self) -> str:
        return " | ".join(self.stderr_tail) or "(no output)"

    async def _drain_stderr(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            self.stderr_tail.append(line.decode(errors="replace").rstrip())

    async def _read(self) -> None:
        assert self._ws is not None
        error: BaseException = BrowserError("the DevTools connection closed")
        try:
            async for message in self._ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    continue
                data = message.json()
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        if "error" in data:
                            future.set_exception(BrowserError(f"{data['error'].get('message')}: {data['error']}"))
                        else:
                            future.set_result(data.get("result", {}))
                    continue
                method, session, params = data.get("method"), data.get("sessionId"), data.get("params", {})
                for waiter in list(self._waiters):
                    want, want_session, predicate, future = waiter
                    if future.done():
                        self._waiters.remove(waiter)
                    elif want == method and want_session == session and (predicate is None or predicate(params)):
                        self._waiters.remove(waiter)
                        future.set_result(params)
        except Exception as exc:  # handed to every waiter below
            error = exc
        for future in [*self._pending.values(), *(w[3] for w in self._waiters)]:
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._waiters.clear()

    async def send(
        self, method: str, timeout: float = 30.0, session_id: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """Run a CDP command (on the browser, or on ``session_id``'s target) and return its result."""
        if self._ws is None or self._ws.closed:
            raise BrowserError(f"{method}: not connected")
        message_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        await self._ws.send_json(message)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._pending.pop(message_id, None)
            raise BrowserError(f"{method}: no answer within {timeout}s") from None

    def expect(
        self, method: str, session_id: str | None = None, predicate: Callable[[dict[str, Any]], bool] | None = None
    ) -> asyncio.Future[Any]:
        """A future for the next ``method`` event (of ``session_id``'s target; None: the browser's)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, session_id, predicate, future))
        return future

    async def targets(self) -> list[dict[str, Any]]:
        """Every target: ``targetId``, ``type`` (page, service_worker, background_page, ...), ``url``, ``title``."""
        result = await self.send("Target.getTargets")
        return list(result.get("targetInfos", []))

    async def wait_for_target(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first target ``predicate`` accepts (e.g. an extension's ``service_worker``), polled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for target in await self.targets():
                if predicate(target):
                    return target
            if loop.time() >= deadline:
                raise BrowserError(f"no matching target within {timeout}s: {await self.targets()}")
            await asyncio.sleep(0.1)

    async def attach(self, target_id: str) -> Session:
        """Drive an existing target (an extension's service worker, a page it opened)."""
        result = await self.send("Target.attachToTarget", targetId=target_id, flatten=True)
        return Session(self, result["sessionId"], target_id)

    async def new_page(self, url: str = "about:blank", width: int = 1440, height: int = 900) -> Session:
        """A new tab with a ``width`` x ``height`` CSS-pixel viewport."""
        target = await self.send("Target.createTarget", url="about:blank")
        page = await self.attach(target["targetId"])
        await page.send(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
        )
        if url != "about:blank":
            await page.navigate(url)
        return page

    async def close(self) -> None:
        """Close the connection and end Chromium (terminate, then kill after 5 s)."""
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close", timeout=5.0), 5.0)
            await self._ws.close()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=5.0)
            self._reader.cancel()
        if self._http is not None:
            await self._http.close()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._stderr_task is not None:
            await asyncio.wait({self._stderr_task}, timeout=5.0)
            self._stderr_task.cancel()
        await asyncio.to_thread(self._profile.cleanup)
