"""The route-file source: a YAML file becomes a complete snapshot, re-read when it changes.

This module owns reading and validating the file (with line numbers, so a bad edit is reported
as ``routes.yaml:12: ...``; ``load_route_file`` is the one validation that ``devstack check``, the
router and the controller all run) and noticing changes by polling its modification time, or at
once when ``reload()`` is called (the CLI wires SIGHUP to it). It never publishes a partial or
invalid snapshot: a bad edit is reported through ``on_error`` and the previous snapshot stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from controller.build import BuildError, LineDict, LineList, merge_snapshots, routes_from_spec
from controller.startup import os_reason
from router.table import Routes

log = logging.getLogger(__name__)

__all__ = ["FileSource", "load_route_file", "parse_route_yaml"]


# libyaml's parser is an order of magnitude faster than the pure-Python one (a 10,000-service
# file: seconds, not tens of seconds, spent holding the GIL while the router serves).
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """Safe loader whose mappings remember the line of each key (for error messages)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise BuildError("mapping keys must be scalars", line=key_node.start_mark.line + 1)
        skey = str(key)
        if skey in result:
            raise BuildError(f"duplicate key {skey!r}", line=key_node.start_mark.line + 1)
        result[skey] = loader.construct_object(value_node, deep=True)
        result.key_lines[skey] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_route_yaml(text: str, origin: str = "<routes>") -> dict[str, Routes]:
    """Parse and validate route-file text; raises ``BuildError`` naming origin and line."""
    try:
        document: Any = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except BuildError as exc:
        raise BuildError(str(exc).split(": ", 1)[-1], origin=origin, line=exc.line) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise BuildError(f"invalid YAML: {exc.problem or exc}", origin=origin, line=line) from None
    except yaml.YAMLError as exc:
        raise BuildError(f"invalid YAML: {exc}", origin=origin) from None
    if document is None:
        document = {"services": {}}
    elif not isinstance(document, dict | list):
        # A lone scalar carries no line of its own; it can only be the first.
        raise BuildError("the route file must be a mapping with a 'services' key", origin=origin, line=1)
    return routes_from_spec(document, origin=origin)


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector around a parse.

    A large route file becomes millions of short-lived, acyclic objects, and every few thousand
    allocations the collector walks the young ones, every few collections the whole heap: for a
    10,000-service file that was two thirds of an 8.8 s parse, in stretches of up to 1.6 s during
    which the event loop (sharing the GIL with the parsing thread) served nothing. Reference
    counting frees everything the parse leaves behind; the collector resumes afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_route_file(path: str | os.PathLike[str]) -> dict[str, Routes]:
    """Read and validate a route file; raises ``BuildError`` naming the file (and line).

    This is the whole validation a route file gets, wherever it is used: ``devstack check``, the
    router's and the controller's file sources. It includes assembling the services into a
    ``RouteTable``, so that what only the table refuses (two services claiming one host) is
    found here too, not first when a router swaps the table in.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BuildError(f"cannot read route file: {os_reason(exc)}", origin=str(path)) from None
    except UnicodeDecodeError as exc:
        raise BuildError(f"cannot read route file: not UTF-8 (byte {exc.start})", origin=str(path)) from None
    with _cyclic_gc_paused():
        services = parse_route_yaml(text, origin=str(path))
    try:
        merge_snapshots({FileSource.name: services}, 1)
    except BuildError as exc:
        raise BuildError(str(exc), origin=str(path)) from None
    return services


class FileSource:
    """Publishes the route file's services; polls for changes every ``interval`` seconds."""

    name = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_snapshot: Callable[[str, Mapping[str, Routes]], object],
        on_error: Callable[[str, Exception], object],
        *,
        interval: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self._on_snapshot = on_snapshot
        self._on_error = on_error
        self._interval = interval
        self._stamp: tuple[int, int, int] | None = None
        self._wakeup = asyncio.Event()

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load_once(self) -> bool:
        """Read the file now; publish on success. True if a snapshot was published."""
        try:
            self.load_first()
        except BuildError as exc:
            self._on_error(self.name, exc)
            return False
        return True

    def load_first(self) -> None:
        """Read the file now and publish it; a file that fails raises ``BuildError`` instead of
        being reported, because a command must not start serving without its first table."""
        self._stamp = self._current_stamp()
        self._on_snapshot(self.name, load_route_file(self.path))

    async def _load(self) -> None:
        # Read and parse off the loop; publish on it, so consumers never see another thread.
        self._stamp = await asyncio.to_thread(self._current_stamp)
        try:
            services = await asyncio.to_thread(load_route_file, self.path)
        except BuildError as exc:
            self._on_error(self.name, exc)
            return
        self._on_snapshot(self.name, services)

    def reload(self) -> None:
        """Re-read at the next opportunity, changed or not (SIGHUP)."""
        self._stamp = None
        self._wakeup.set()

    async def run(self, *, _iterations: int | None = None) -> None:
        """Poll forever (or ``_iterations`` times, for tests); the first load happens at once."""
        count = 0
        if self._stamp is None:
            await self._load()
        while _iterations is None or count < _iterations:
            count += 1
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._interval)
            except TimeoutError:
                pass
            self._wakeup.clear()
            stamp = await asyncio.to_thread(self._current_stamp)
            if stamp != self._stamp:
                log.debug("re-reading %s", self.path)
                await self._load()
