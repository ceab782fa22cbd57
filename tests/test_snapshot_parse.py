"""Feed lines decoded and tables built in slices (controller/snapshot.py), against the one-go path
they replace (``json.loads``, ``routes_from_json``, ``table_fields``, ``RouteTable``): the same
table and route groups, or the same error, for generated tables, tables with a fault and lines
broken anywhere; the collector's thresholds always given back; a router following a feed keeps
its loop turning while a large snapshot is built, and refuses a bad one whole; and, measured, a
10,000-service snapshot never holds the loop for long."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.snapshot import at_once, in_slices, longest_stall, snapshot_line
from controller.build import BuildError
from controller.snapshot import decode_line
from controller.sources.remote import RemoteSettings, RemoteSource
from router.table import RouteTable
from tests.kube.kube_support import eventually

ORIGIN = "http://controller.test:9902"
PIECE = 64 * 1024
"""What one socket read hands the line splitter, as the feed's HTTP client reads."""

Outcome = tuple[object, ...]


def _outcome(make: Callable[[], object]) -> Outcome:
    """What ``make`` made (a value), or how it failed (the error's type and message)."""
    try:
        return ("value", make())
    except Exception as exc:  # the error is the outcome compared
        return ("error", type(exc), str(exc))


async def _outcome_of(make: Callable[[], Awaitable[object]]) -> Outcome:
    try:
        return ("value", await make())
    except Exception as exc:  # the error is the outcome compared
        return ("error", type(exc), str(exc))


def _seen(built: tuple[RouteTable, dict[str, object]]) -> tuple[object, ...]:
    """A table as compared: equal services, in the same order, writing the same JSON; its groups."""
    table, groups = built
    return (table, list(table.services), table.to_json(), groups)


async def _in_slices_seen(line: bytes) -> tuple[object, ...]:
    """Every line sliced, however short, with a yield to the loop after every step."""
    return _seen(await in_slices(line, origin=ORIGIN, slice_seconds=0.0, whole_below=0))


def _both(line: bytes) -> tuple[Outcome, Outcome]:
    """The one-go path's outcome and the sliced one's for ``line``."""
    return _outcome(lambda: _seen(at_once(line, origin=ORIGIN))), uvloop.run(_outcome_of(lambda: _in_slices_seen(line)))


def _decoded_both(line: bytes) -> tuple[Outcome, Outcome]:
    sliced = uvloop.run(_outcome_of(lambda: decode_line(line, slice_seconds=0.0, whole_below=0)))
    return _outcome(lambda: json.loads(line)), sliced


# --- generated tables ----------------------------------------------------------------------------

_LABELS = st.from_regex(r"[a-z][a-z0-9]{0,4}", fullmatch=True)
_GROUP_NAMES = st.from_regex(r"team-[a-z]{1,3}", fullmatch=True)  # never an override's key (no hyphen)
_UPSTREAMS = st.sampled_from(
    ["http://10.0.0.1", "http://10.0.0.2:8080", "http://upstream.example:81/", "http://[::1]:90"]
)
_EXPIRIES = st.one_of(
    st.none(),
    st.integers(0, 2**32),
    st.floats(0, 2e9),
    st.sampled_from(["2030-01-01T00:00:00Z", "2030-01-01T00:00:00+02:00", "2030-01-01"]),
)
_TEXT = st.one_of(st.none(), st.text(max_size=6))  # escapes and non-ASCII: the decoder's business
_OVERRIDES = st.one_of(
    _UPSTREAMS,  # the short form: just the URL
    st.fixed_dictionaries(
        {"url": _UPSTREAMS},
        optional={
            "ready": st.booleans(),
            "expires": _EXPIRIES,
            "fallback": st.sampled_from(["error", "baseline"]),
            "namespace": _TEXT,
            "workload": _TEXT,
        },
    ),
)


@st.composite
def _documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid snapshot document: services with hosts of their own, overrides, route groups."""
    groups = draw(st.dictionaries(_GROUP_NAMES, st.lists(_LABELS, min_size=1, max_size=3), max_size=2))
    services: dict[str, Any] = {}
    for name in draw(st.lists(_LABELS, unique=True, max_size=8)):
        body: dict[str, Any] = {
            "hosts": [f"{name}.{host}" for host in draw(st.lists(_LABELS, unique=True, max_size=2))],
            "baseline": draw(_UPSTREAMS),
            "overrides": draw(st.dictionaries(_LABELS, _OVERRIDES, max_size=4)),
        }
        if draw(st.booleans()):
            body["protocol"] = draw(st.sampled_from(["http1", "h2c"]))
        services[name] = body
    fields = {
        "kind": "snapshot",
        "version": draw(st.integers(0, 2**40)),
        "instance": draw(st.text(max_size=6)),
        "sources": draw(st.lists(_LABELS, max_size=2)),
        "groups": groups,
        "services": services,
    }
    order = draw(st.permutations(list(fields)))  # the feed writes ``services`` last; a line need not
    return {key: fields[key] for key in order}


@st.composite
def _lines(draw: st.DrawFn, documents: st.SearchStrategy[dict[str, Any]] | None = None) -> bytes:
    """A document as a line, in any of the spellings json.dumps has."""
    document = draw(documents if documents is not None else _documents())
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
    indent = draw(st.sampled_from([None, 0, 2]))
    ensure_ascii = draw(st.booleans())
    padding = draw(st.sampled_from(["", " ", "\t", "\r\n "]))
    text = json.dumps(document, separators=separators, indent=indent, ensure_ascii=ensure_ascii)
    return (padding + text + padding).encode()


@settings(max_examples=200, deadline=None)
@given(line=_lines())
def test_a_generated_table_comes_out_as_the_one_go_path_builds_it(line: bytes) -> None:
    one_go, sliced = _both(line)
    assert one_go[0] == "value", one_go
    assert sliced == one_go


async def _decoded_counting_turns(line: bytes) -> tuple[object, int]:
    """The line decoded in slices of one step each, and how often another task ran meanwhile."""
    turns = 0
    decoding = True

    async def count() -> None:
        nonlocal turns
        while decoding:
            turns += 1
            await asyncio.sleep(0)

    counting = asyncio.create_task(count(), name="turn-count")
    try:
        return await decode_line(line, slice_seconds=0.0, whole_below=0), turns
    finally:
        decoding = False
        await counting


@settings(max_examples=100, deadline=None)
@given(line=_lines())
def test_a_valid_line_is_decoded_a_member_at_a_time(line: bytes) -> None:
    """Not handed whole to json.loads (which a broken line is, for its message): every member but
    the last, and every service, is followed by a turn of the loop."""
    document, turns = uvloop.run(_decoded_counting_turns(line))
    assert document == json.loads(line)
    assert turns >= len(document) - 1 + len(document["services"])


# --- tables with a fault -------------------------------------------------------------------------

Fault = Callable[[dict[str, Any], str, str], None]
"""Breaks a document in place, given one of its services and one of its route groups' names."""


def _in_service(change: Callable[[dict[str, Any]], None]) -> Fault:
    return lambda document, service, group: change(document["services"][service])


def _in_override(change: Callable[[dict[str, Any]], None]) -> Fault:
    def fault(document: dict[str, Any], service: str, group: str) -> None:
        overrides = document["services"][service]["overrides"]
        overrides["zz"] = {"url": "http://10.9.9.9"}
        change(overrides["zz"])

    return fault


def _claim(document: dict[str, Any], service: str, group: str) -> None:
    # A hyphenated name: never one of the generated services, so it is always a second claimant.
    document["services"]["zz-claimer"] = {"hosts": [f"{service}.claimed"], "baseline": "http://10.0.0.9"}
    document["services"][service]["hosts"].append(f"{service}.claimed")


def _override_named_after_group(document: dict[str, Any], service: str, group: str) -> None:
    document["groups"][group] = ["alice"]
    document["services"][service]["overrides"][group] = "http://10.0.0.8"


FAULTS: dict[str, Fault] = {
    "version-negative": lambda document, service, group: document.update(version=-1),
    "version-boolean": lambda document, service, group: document.update(version=True),
    "version-missing": lambda document, service, group: document.pop("version"),
    "services-a-list": lambda document, service, group: document.update(services=[]),
    "sources-not-names": lambda document, service, group: document.update(sources=["file", 1]),
    "groups-a-list": lambda document, service, group: document.update(groups=["team"]),
    "group-empty": lambda document, service, group: document["groups"].update({group: []}),
    "group-lists-a-group": lambda document, service, group: document["groups"].update({group: [group]}),
    "service-name-not-a-label": lambda document, service, group: document["services"].update(Bad_Name={}),
    "service-a-string": lambda document, service, group: document["services"].update({service: "http://10.0.0.1"}),
    "service-empty": _in_service(lambda body: body.clear()),
    "service-unknown-key": _in_service(lambda body: body.update(weight=3)),
    "hosts-not-a-list": _in_service(lambda body: body.update(hosts="a.example")),
    "baseline-not-http": _in_service(lambda body: body.update(baseline="ftp://10.0.0.1")),
    "baseline-with-a-path": _in_service(lambda body: body.update(baseline="http://10.0.0.1/api")),
    "protocol-unknown": _in_service(lambda body: body.update(protocol="h3")),
    "overrides-a-list": _in_service(lambda body: body.update(overrides=["alice"])),
    "override-key-not-a-label": _in_service(lambda body: body["overrides"].update({"Al ice": "http://10.0.0.1"})),
    "override-url-missing": _in_override(lambda override: override.pop("url")),
    "override-url-bad-port": _in_override(lambda override: override.update(url="http://10.0.0.1:99999")),
    "override-ready-not-boolean": _in_override(lambda override: override.update(ready="yes")),
    "override-fallback-unknown": _in_override(lambda override: override.update(fallback="later")),
    "override-expires-not-a-date": _in_override(lambda override: override.update(expires="soon")),
    "override-expires-boolean": _in_override(lambda override: override.update(expires=True)),
    "override-namespace-a-number": _in_override(lambda override: override.update(namespace=3)),
    "override-unknown-key": _in_override(lambda override: override.update(weight=3)),
    "two-services-claim-a-host": _claim,
    "override-named-after-a-group": _override_named_after_group,
}


@st.composite
def _faulty_documents(draw: st.DrawFn) -> dict[str, Any]:
    document = copy.deepcopy(draw(_documents()))
    document["services"].setdefault("first", {"hosts": [], "baseline": "http://10.0.0.1", "overrides": {}})
    document["groups"].setdefault("team-x", ["alice"])
    service = draw(st.sampled_from(sorted(document["services"])))
    document["services"][service].setdefault("overrides", {})
    group = draw(st.sampled_from(sorted(document["groups"])))
    # Sometimes two: which of them is reported must be the one the one-go path finds first.
    for fault in draw(st.lists(st.sampled_from(sorted(FAULTS)), min_size=1, max_size=2, unique=True)):
        with contextlib.suppress(KeyError, AttributeError, TypeError):  # the first fault took what it needs
            FAULTS[fault](document, service, group)
    return document


@settings(max_examples=300, deadline=None)
@given(line=_lines(_faulty_documents()))
def test_a_table_with_a_fault_is_refused_with_the_one_go_paths_error(line: bytes) -> None:
    one_go, sliced = _both(line)
    assert one_go[0] == "error", one_go
    assert sliced == one_go


def _large_document(fault: str) -> dict[str, Any]:
    """200 valid services (so a fault at the last comes after many slices), then ``fault`` there."""
    document: dict[str, Any] = json.loads(snapshot_line(200, 3))
    document["groups"] = {"team-a": ["dev00"]}
    FAULTS[fault](document, "svc00199", "team-a")
    return document


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("two-services-claim-a-host", "host 'svc00199.claimed' is claimed by both 'svc00199' and 'zz-claimer'"),
        ("baseline-not-http", "service 'svc00199': baseline upstream 'ftp://10.0.0.1': only http:// upstreams"),
        ("override-named-after-a-group", "service 'svc00199': override key 'team-a' is also a route group's name"),
        ("service-name-not-a-label", "service name 'Bad_Name' must be a DNS-1123 label"),
        ("override-fallback-unknown", "override 'zz': 'fallback' must be 'error' or 'baseline'"),
        ("sources-not-names", "'sources' must be a list of names"),
        ("version-negative", "'version' must be a non-negative integer"),
    ],
)
def test_a_large_snapshot_with_a_fault_is_refused_with_the_one_go_paths_build_error(fault: str, message: str) -> None:
    line = json.dumps(_large_document(fault)).encode()
    one_go, sliced = _both(line)
    assert sliced == one_go
    assert sliced[1] is BuildError and str(sliced[2]).startswith(f"{ORIGIN}: ") and message in str(sliced[2])


@pytest.mark.parametrize(
    "line",
    [
        b'{"kind":"snapshot","version":1,"services":{"a":{"baseline":"http://10.0.0.1"},}}',  # a trailing comma
        b'{"kind":"snapshot","version":1,"services":{"a":{"baseline":"http://10.0.0.1"}}',  # cut short
        b'{"kind":"snapshot","version":1,"services":{"a" {"baseline":"http://10.0.0.1"}}}',  # no colon
        b'{"kind":"snapshot","version":1,"services":{"a":{"baseline":"http://10.0.0.1"}}} {}',  # extra data
        b'{"kind":"snapshot","version":1,"services":{"a":{"baseline":http://10.0.0.1}}}',  # a bare word
        b'{"kind":"snapshot" "version":1}',  # no comma
        b'{kind:"snapshot"}',  # an unquoted name
        b'{"kind":"snapshot","version":1,"services":{"a":{"baseline":"http://\xff"}}}',  # not UTF-8
        b"",
    ],
)
def test_a_broken_line_fails_with_json_loads_own_error(line: bytes) -> None:
    one_go, sliced = _decoded_both(line)
    assert one_go[0] == "error", one_go
    assert sliced == one_go


@pytest.mark.parametrize("line", [b'["kind","snapshot"]', b' "snapshot" ', b"3", b"{}", b'{"services":[{}]}'])
def test_a_line_that_is_json_but_no_feed_object_decodes_as_json_loads_decodes_it(line: bytes) -> None:
    one_go, sliced = _decoded_both(line)
    assert one_go[0] == "value", one_go
    assert sliced == one_go


@settings(max_examples=300, deadline=None)
@given(line=_lines(), data=st.data())
def test_a_line_broken_anywhere_decodes_as_json_loads_decodes_it(line: bytes, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(line)), label="at")
    how = data.draw(st.sampled_from(["cut", "drop", "insert"]), label="how")
    inserted = data.draw(st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"', b" ", b"0", b"n", b"\\"]))
    broken = {"cut": line[:at], "drop": line[:at] + line[at + 1 :], "insert": line[:at] + inserted + line[at:]}[how]
    one_go, sliced = _decoded_both(broken)
    assert sliced == one_go


# --- the collector ------------------------------------------------------------------------------


async def test_full_collections_are_held_back_only_while_a_table_is_built() -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []

    async def look() -> None:
        for _ in range(20):
            seen.append(gc.get_threshold())
            await asyncio.sleep(0)

    line = snapshot_line(200, 3)
    looking = asyncio.create_task(look(), name="threshold-look")
    await in_slices(line, slice_seconds=0.0, whole_below=0)
    await looking
    assert gc.get_threshold() == before
    assert seen and all(threshold[:2] == before[:2] and threshold[2] > 1_000_000 for threshold in seen)


async def test_the_collectors_thresholds_come_back_after_builds_that_fail_overlap_or_are_cancelled() -> None:
    before = gc.get_threshold()
    bad = json.dumps(_large_document("two-services-claim-a-host")).encode()
    good = snapshot_line(300, 3)
    results = await asyncio.gather(
        in_slices(bad, slice_seconds=0.0, whole_below=0),
        in_slices(good, slice_seconds=0.0, whole_below=0),
        return_exceptions=True,
    )
    assert isinstance(results[0], BuildError) and isinstance(results[1], tuple)
    assert gc.get_threshold() == before
    cancelled = asyncio.create_task(in_slices(good, slice_seconds=0.0, whole_below=0), name="cancelled-build")
    await asyncio.sleep(0.01)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert gc.get_threshold() == before


# --- a router following a feed -------------------------------------------------------------------


class _ScriptedFeed:
    """A ``FeedTransport`` whose response is ``lines`` in socket-read pieces; the stream then stays open."""

    def __init__(self, *lines: bytes) -> None:
        self.lines = lines
        self.delivered = asyncio.Event()
        """Set as the last piece of the last line is handed over."""

    @contextlib.asynccontextmanager
    async def get(self, url: str, headers: dict[str, str]) -> AsyncIterator[_ScriptedFeed]:
        yield self

    @property
    def status(self) -> int:
        return 200

    async def body(self) -> AsyncIterator[bytes]:
        stream = b"".join(line + b"\n" for line in self.lines)
        for start in range(0, len(stream), PIECE):
            await asyncio.sleep(0)  # a socket read: the loop turns between pieces
            if start + PIECE >= len(stream):
                self.delivered.set()
            yield stream[start : start + PIECE]
        await asyncio.Event().wait()  # held open, as a controller does


@contextlib.asynccontextmanager
async def _following(feed: _ScriptedFeed, errors: list[Exception]) -> AsyncIterator[RemoteSource]:
    source = RemoteSource(
        ORIGIN,
        lambda name, services: None,
        lambda name, exc: errors.append(exc),
        settings=RemoteSettings(),
        transport=feed,
    )
    task = asyncio.create_task(source.run(), name="remote-source-under-test")
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _turns_until(condition: Callable[[], bool], after: asyncio.Event) -> int:
    """How often the loop ran this task between ``after`` and ``condition`` (a millisecond apart)."""
    await after.wait()
    turns = 0
    async with asyncio.timeout(60):
        while not condition():
            await asyncio.sleep(0.001)
            turns += 1
    return turns


async def test_a_router_keeps_its_loop_turning_while_a_large_snapshot_is_built() -> None:
    line = snapshot_line(2000, 5, version=7)
    feed = _ScriptedFeed(line)
    errors: list[Exception] = []
    async with _following(feed, errors) as source:
        turns = await _turns_until(lambda: source.table is not None, after=feed.delivered)
    # The reference, built in one go, on a thread: on this test's loop it would block it for a second.
    expected, _ = await asyncio.to_thread(at_once, line, origin=ORIGIN)
    assert errors == []
    assert source.table == expected and source.table.to_json() == expected.to_json() and source.version == 7
    # Built in one go, the line would be applied before this task ran again: zero turns.
    assert turns >= 10, f"the loop ran the watching task only {turns} times while the snapshot was built"


async def test_a_large_snapshot_with_a_fault_is_refused_whole_and_the_held_table_kept() -> None:
    held = snapshot_line(3, 1, version=1)
    bad = json.dumps({**_large_document("two-services-claim-a-host"), "version": 2}).encode()
    feed = _ScriptedFeed(held, bad)
    errors: list[Exception] = []
    async with _following(feed, errors) as source:
        await eventually(lambda: errors, timeout=60, what="the bad snapshot's rejection")
        assert source.table is not None and source.table.version == 1
    with pytest.raises(BuildError) as one_go:
        at_once(bad, origin=ORIGIN)
    assert [str(error) for error in errors] == [str(BuildError(f"rejected table: {one_go.value}", origin=ORIGIN))]


# --- measured ------------------------------------------------------------------------------------


async def _stalls(line: bytes) -> tuple[tuple[Any, float, float], tuple[Any, float, float]]:
    async def one_go() -> tuple[RouteTable, dict[str, object]]:
        return at_once(line, origin=ORIGIN)

    return await longest_stall(one_go), await longest_stall(lambda: in_slices(line, origin=ORIGIN))


@pytest.mark.slow
def test_a_10000_service_snapshot_never_holds_the_loop_for_long() -> None:
    """Synchronous, so that the one-go path may block the loop it is compared on (the blocking guard
    watches async tests). The bound is a ratio to the one-go path's stall on the same host, and well
    under what a request waiting on the loop would notice. What follows the build (a full collection
    of the new objects, deferred while it ran; the old table's release) is not measured here."""
    line = snapshot_line(10_000, 4)
    (expected, one_go_seconds, one_go_stall), (built, sliced_seconds, sliced_stall) = uvloop.run(_stalls(line))
    assert built == expected
    assert one_go_stall >= one_go_seconds * 0.9, "the one-go path holds the loop throughout"
    assert sliced_stall < one_go_stall / 5, (
        f"the loop waited up to {sliced_stall * 1e3:.0f} ms while the snapshot was built in slices "
        f"({sliced_seconds:.2f} s); {one_go_stall * 1e3:.0f} ms in one go"
    )
