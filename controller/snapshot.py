"""Large feed lines decoded, and whole tables built from them, without holding up the event loop.

A router following a controller receives the whole table as one line (a ``/v2`` snapshot: 15 MB
of JSON for 10,000 services and 100,000 overrides). Decoded and built in one go, it holds the
router's loop for seconds, and every request in flight waits. This module does the same work
(``json.loads``, then ``controller.build``'s checks and ``RouteTable``) in slices of a few
milliseconds, yielding to the loop between them: each service's JSON is decoded on its own (by
the C decoder, from its offset in the line) and each service is checked and built on its own;
only the last step, ``RouteTable``'s host index, is one piece (about 15 ms for 10,000 services,
as long as the aggregator's merge that follows takes for the same index). The results and
errors are exactly the one-go path's (a broken line is decoded again in one go, for json's own
message). While it works the cyclic collector's full collections are held back: each would
walk the whole growing heap at once, a slice cannot break one up, and one follows the build
anyway. A thread or a process would not help: decoding and building hold the GIL, and a million
objects sent back from a process cost as much to unpickle. This module never applies a table:
it returns one, or raises before anything was built that could be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import time
from collections.abc import Generator, Iterator, Mapping
from typing import Any, Final, TypeVar

from controller.build import iter_routes, table_fields, table_spec
from router.table import Routes, RouteTable

__all__ = ["SLICE_SECONDS", "WHOLE_LINE_BYTES", "decode_line", "table_from_json"]

SLICE_SECONDS: Final = 0.005
"""How long one slice may hold the loop: a request waiting behind it barely notices, and a slice
still decodes a few hundred services or builds a dozen or more (about 0.3 ms each with ten
overrides), so the yields between slices (microseconds each) cost nothing measurable."""
WHOLE_LINE_BYTES: Final = 64 * 1024
"""A line shorter than this is decoded in one go (under a millisecond): a delta, a small table."""
_SLICED_MEMBER: Final = "services"
"""The one member of a line that grows with the table: decoded a service at a time."""

_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as json.decoder skips it
_DECODER: Final = json.JSONDecoder()
_NEVER: Final = 2**31 - 1  # a full collection's threshold no count reaches (the collector stores a C int)

_Result = TypeVar("_Result")


class _Malformed(ValueError):
    """The line is not well-formed JSON: decode it again in one go for the decoder's own message."""


async def decode_line(line: bytes, *, slice_seconds: float = SLICE_SECONDS, whole_below: int = WHOLE_LINE_BYTES) -> Any:
    """``json.loads(line)``, in slices when the line is ``whole_below`` bytes or longer: the same
    value, or the same error."""
    if len(line) < whole_below:
        return json.loads(line)
    try:
        # As json.loads does with bytes: the encoding from the first bytes, surrogates passed through.
        text = line.decode(json.detect_encoding(line), "surrogatepass")
        return await _in_slices(_document(text), slice_seconds)
    except ValueError:
        # Broken JSON (a broken controller: rare) is reported with json's own message, which only
        # decoding the line in one go gives for sure; Python versions word some of them differently.
        return json.loads(line)


async def table_from_json(
    document: Mapping[str, Any], *, origin: str = "", slice_seconds: float = SLICE_SECONDS
) -> tuple[RouteTable, dict[str, object]]:
    """A table document (a /v2 snapshot line, decoded) → its ``RouteTable`` and its route groups as
    the feed wrote them, built in slices: what ``routes_from_json``, ``table_fields`` and
    ``RouteTable`` give in one go, the same table or the same ``BuildError`` (or ``TableError``)."""
    return await _in_slices(_table(document, origin), slice_seconds)


async def _in_slices(steps: Generator[None, None, _Result], slice_seconds: float) -> _Result:
    """Run ``steps`` to its result, yielding to the loop whenever a slice has used its time."""
    with _full_collections_deferred():
        deadline = time.perf_counter() + slice_seconds
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: _Result = done.value
                return result
            if time.perf_counter() >= deadline:
                await asyncio.sleep(0)
                deadline = time.perf_counter() + slice_seconds


_deferrals = 0
"""Sliced jobs running now (each on the loop, so no lock): the threshold is restored after the last."""
_threshold: tuple[int, int, int] = gc.get_threshold()


@contextlib.contextmanager
def _full_collections_deferred() -> Iterator[None]:
    """Hold back the cyclic GC's full collections (the young ones go on) while a table is built.

    A 10,000-service table is about a million new objects. Each time the heap has grown by a
    quarter, CPython walks all of it in one full collection: about ten during one build, the last
    ones 0.2-0.7 s each. Held back, they become one full collection soon after the build (the
    growth is still pending then), as long as the longest of them or somewhat longer since it
    walks the finished table: one pause instead of ten, and a build that takes a fifth less. The
    young collections go on, so what requests leave in cycles meanwhile is still collected.
    """
    global _deferrals, _threshold  # noqa: PLW0603 - the collector's thresholds are the process's
    if _deferrals == 0:
        _threshold = gc.get_threshold()
        gc.set_threshold(_threshold[0], _threshold[1], _NEVER)
    _deferrals += 1
    try:
        yield
    finally:
        _deferrals -= 1
        if _deferrals == 0:
            gc.set_threshold(*_threshold)


def _table(document: Mapping[str, Any], origin: str) -> Generator[None, None, tuple[RouteTable, dict[str, object]]]:
    # The one-go path's order of checks, so the first error found is the same one.
    version, spec = table_spec(document, origin=origin)
    services: dict[str, Routes] = {}
    for routes in iter_routes(spec, origin=origin):
        services[routes.service] = routes
        yield
    sources, groups = table_fields(document, origin=origin)
    return RouteTable(services, version, sources), groups


def _document(text: str) -> Generator[None, None, Any]:
    """The line's value, a step per member of its outer object (and of its ``services``)."""
    at = _skip_whitespace(text, 0)
    if not text.startswith("{", at):
        raise _Malformed("not an object")  # a feed line always is; json's one go says what else it is
    document, at = yield from _object(text, at, sliced=_SLICED_MEMBER)
    if _skip_whitespace(text, at) != len(text):
        raise _Malformed("extra data")
    return document


def _object(text: str, at: int, *, sliced: str | None) -> Generator[None, None, tuple[dict[str, Any], int]]:
    """The object at ``text[at]`` (its ``{``) and the index after it; the member named ``sliced``,
    when it is an object, is decoded member by member in turn. Member order and duplicate names
    come out as json.loads makes them (a dict: a name's first place, its last value)."""
    skip = _skip_whitespace
    value: dict[str, Any] = {}
    at = skip(text, at + 1)
    if text.startswith("}", at):
        return value, at + 1
    while True:
        if not text.startswith('"', at):
            raise _Malformed("expecting a member's name")
        name, at = _DECODER.raw_decode(text, at)
        at = skip(text, at)
        if not text.startswith(":", at):
            raise _Malformed("expecting ':'")
        at = skip(text, at + 1)
        if name == sliced and text.startswith("{", at):
            value[name], at = yield from _object(text, at, sliced=None)
        else:
            value[name], at = _DECODER.raw_decode(text, at)
            yield
        at = skip(text, at)
        if text.startswith("}", at):
            return value, at + 1
        if not text.startswith(",", at):
            raise _Malformed("expecting ',' or '}'")
        at = skip(text, at + 1)


def _skip_whitespace(text: str, at: int) -> int:
    """The index of the first character at or after ``at`` that is not JSON whitespace."""
    match = _WHITESPACE.match(text, at)
    return at if match is None else match.end()  # never None: the pattern matches the empty string
