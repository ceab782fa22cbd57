"""W3C Trace Context: the W3C test suite's 41 cases against a service on the SDK, then the parts alone.

The W3C suite (github.com/w3c/trace-context, ``test/test.py``, run at ``STRICT_LEVEL=2`` and
``SPEC_LEVEL=2``) posts its test service a JSON list of ``{"url", "arguments"}`` with chosen
trace-context headers; the service POSTs each ``arguments`` to its ``url``, and the suite checks the
``traceparent`` and ``tracestate`` each of those callbacks arrived with. Here the same, on loopback:

    direct:       harness ──► service ──► next hop
    via-routers:  harness ──► ingress router ──► service ──► sidecar router ──► next hop
                              (Host: service)               (HTTP proxy, http://nexthop/…)

The service is built as one on the SDK is: its aiohttp middleware, a server span and one client
span per call from an OpenTelemetry SDK tracer, and its client session. Each case restates one of
the suite's (named in ``@restates``) with the suite's inputs and at least its assertions; where the
spec asks more than the suite checks (a restarted trace drops ``tracestate``, an empty one is not
sent), that is checked too. Callbacks are read by an oracle of our own, the suite's reading: one
valid version-00 ``traceparent``, and a ``tracestate`` every member of which matches the grammar.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from propagation.aiohttp import client_session, middleware
from propagation.carriers import extract, inject
from propagation.tracecontext import (
    MAX_TRACESTATE_CHARS,
    DevstackTraceContextPropagator,
    TraceParent,
    W3CTraceState,
    format_tracestate,
    parse_traceparent,
    parse_tracestate,
)
from router.settings import Mode, RouterSettings
from router.tracing import RequestTracer
from tests.support import Origin, make_table, running_router

TRACE_ID = "12345678901234567890123456789012"
PARENT_ID = "1234567890123456"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
UNSAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300, deadline=None)

# --- the service under test ----------------------------------------------------------------------

TRACER = TracerProvider(shutdown_on_exit=False).get_tracer("w3c-suite-service")


def service_app(proxy: str | None) -> web.Application:
    """The suite's test service: POSTs every instruction's arguments to its URL, in order, each
    call under its own client span, inside the server span of the request it serves."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def follow(request: web.Request) -> web.Response:
        instructions: list[dict[str, Any]] = await request.json()
        with TRACER.start_as_current_span("POST /test", kind=SpanKind.SERVER):
            for instruction in instructions:
                with TRACER.start_as_current_span("POST", kind=SpanKind.CLIENT):
                    session = request.app[session_key]
                    async with session.post(instruction["url"], json=instruction["arguments"], proxy=proxy) as resp:
                        resp.raise_for_status()
        return web.json_response({"called": len(instructions)})

    async def session_context(app: web.Application) -> AsyncIterator[None]:
        async with client_session() as session:
            app[session_key] = session
            yield

    app = web.Application(middlewares=[middleware])
    app.cleanup_ctx.append(session_context)
    app.router.add_post("/test", follow)
    return app


# --- the harness and its oracle ------------------------------------------------------------------

_ARRIVED_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# The suite's own reading of a list-member, restated independently of the code under test.
_ARRIVED_MEMBER = re.compile(
    r"([a-z0-9][a-z0-9_\-*/@]{0,255})=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])"
)


@dataclasses.dataclass(frozen=True)
class Arrived:
    """The trace context one callback arrived with."""

    trace_id: str
    parent_id: str
    trace_flags: int
    tracestate: tuple[tuple[str, str], ...]
    """In order, the first of duplicated keys (as the suite reads it)."""
    tracestate_lines: tuple[str, ...]

    @property
    def state(self) -> dict[str, str]:
        return dict(self.tracestate)

    @property
    def state_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.tracestate)


def arrived(headers: list[tuple[str, str]]) -> Arrived:
    """Reads a callback's headers as the suite does; fails on anything it would fail on."""
    traceparents = [v for k, v in headers if k.lower() == "traceparent"]
    assert len(traceparents) == 1, f"expected one traceparent, got {traceparents}"
    match = _ARRIVED_TRACEPARENT.fullmatch(traceparents[0])
    assert match is not None, f"not a version-00 traceparent: {traceparents[0]!r}"
    trace_id, parent_id, flags = match.groups()
    assert trace_id != "0" * 32 and parent_id != "0" * 16, traceparents[0]
    lines = tuple(v for k, v in headers if k.lower() == "tracestate")
    entries: dict[str, str] = {}
    for line in lines:
        for member in re.split(r"[ \t]*,[ \t]*", line):
            if member:
                found = _ARRIVED_MEMBER.fullmatch(member)
                assert found is not None, f"the service sent an invalid tracestate member {member!r}"
                entries.setdefault(found[1], found[2])
    assert len(entries) <= 32, lines
    return Arrived(trace_id, parent_id, int(flags, 16), tuple(entries.items()), lines)


class Harness:
    """The suite's part: sends the service a request with chosen headers and callback URLs, and
    reads what each callback arrived with at the next hop."""

    def __init__(
        self, session: aiohttp.ClientSession, service_url: str, host: str | None, next_hop: Origin, callbacks: str
    ) -> None:
        self.session = session
        self.service_url = service_url
        self.host = host
        self.next_hop = next_hop
        self.callbacks = callbacks
        self.scope = 0

    async def send(self, headers: list[tuple[str, str]], calls: int = 1) -> list[Arrived]:
        self.scope += 1
        paths = [f"/{self.scope}.{n}" for n in range(calls)]
        instructions = [{"url": self.callbacks + path, "arguments": []} for path in paths]
        sent = [*headers, *([("Host", self.host)] if self.host else [])]
        async with self.session.post(self.service_url, json=instructions, headers=sent) as resp:
            assert resp.status == 200, await resp.text()
        # The service answers only after its last call was answered: every callback is recorded.
        by_path = {seen.path: seen for seen in self.next_hop.seen}
        callbacks = [by_path[path] for path in paths]
        if self.host is not None:  # via routers: the callbacks too came through one
            assert all(seen.header("x-forwarded-host") == ["nexthop"] for seen in callbacks)
        return [arrived(seen.headers) for seen in callbacks]

    async def one(self, *headers: tuple[str, str]) -> Arrived:
        return (await self.send(list(headers)))[0]

    async def assert_restarts(self, *traceparents: str) -> None:
        """Each of ``traceparents`` is invalid: a new trace starts and the tracestate sent along
        with it is dropped (the suite checks only the trace id)."""
        for value in traceparents:
            got = await self.one(("traceparent", value), ("tracestate", "foo=1"))
            assert got.trace_id not in (TRACE_ID, "0" * 32), value
            assert value[3:35] != got.trace_id, value
            assert got.tracestate_lines == (), value

    async def assert_continues(self, *headers: tuple[str, str]) -> Arrived:
        """``headers`` carry a valid traceparent of TRACE_ID: the trace goes on under a new parent."""
        got = await self.one(*headers)
        assert got.trace_id == TRACE_ID, headers
        assert got.parent_id != PARENT_ID, headers
        return got

    async def assert_state_discarded(self, *tracestates: str) -> None:
        for value in tracestates:
            got = await self.assert_continues(("traceparent", UNSAMPLED), ("tracestate", value))
            assert got.tracestate_lines == (), value


def _router_tracer(traced: bool) -> RequestTracer | None:
    """A traced router is a trace-context participant itself (a span per hop, tracestate
    re-sent by the trace it belongs to): it must pass the same cases."""
    return RequestTracer(TracerProvider()) if traced else None


@pytest.fixture(params=["direct", "via-routers", "via-traced-routers"])
async def harness(request: pytest.FixtureRequest, aiohttp_server: ServerFactory) -> AsyncIterator[Harness]:
    next_hop = Origin("next-hop")
    await next_hop.start()
    try:
        async with aiohttp.ClientSession() as session:
            if request.param == "direct":
                service = await aiohttp_server(service_app(proxy=None))
                yield Harness(session, str(service.make_url("/test")), None, next_hop, next_hop.url)
                return
            sidecar_table = make_table({"nexthop": {"baseline": next_hop.url, "hosts": ["nexthop"]}})
            tracer = _router_tracer(request.param == "via-traced-routers")
            async with running_router(sidecar_table, RouterSettings(mode=Mode.SIDECAR), tracer=tracer) as sidecar:
                service = await aiohttp_server(service_app(proxy=f"http://127.0.0.1:{sidecar.address[1]}"))
                ingress_table = make_table({"service": {"baseline": str(service.make_url("")), "hosts": ["service"]}})
                async with running_router(ingress_table, tracer=tracer) as ingress:
                    url = f"http://127.0.0.1:{ingress.address[1]}/test"
                    yield Harness(session, url, "service", next_hop, "http://nexthop")
    finally:
        await next_hop.close()


SUITE_CASES = (
    "test_both_traceparent_and_tracestate_missing",
    "test_traceparent_included_tracestate_missing",
    "test_traceparent_duplicated",
    "test_traceparent_header_name",
    "test_traceparent_header_name_valid_casing",
    "test_traceparent_version_0x00",
    "test_traceparent_version_0xcc",
    "test_traceparent_version_0xff",
    "test_traceparent_version_illegal_characters",
    "test_traceparent_version_too_long",
    "test_traceparent_version_too_short",
    "test_traceparent_trace_id_all_zero",
    "test_traceparent_trace_id_illegal_characters",
    "test_traceparent_trace_id_too_long",
    "test_traceparent_trace_id_too_short",
    "test_traceparent_parent_id_all_zero",
    "test_traceparent_parent_id_illegal_characters",
    "test_traceparent_parent_id_too_long",
    "test_traceparent_parent_id_too_short",
    "test_traceparent_trace_flags_illegal_characters",
    "test_traceparent_trace_flags_too_long",
    "test_traceparent_trace_flags_too_short",
    "test_traceparent_ows_handling",
    "test_tracestate_included_traceparent_missing",
    "test_tracestate_included_traceparent_included",
    "test_tracestate_header_name",
    "test_tracestate_header_name_valid_casing",
    "test_tracestate_empty_header",
    "test_tracestate_multiple_headers_different_keys",
    "test_tracestate_duplicated_keys",
    "test_tracestate_all_allowed_characters",
    "test_tracestate_ows_handling",
    "test_tracestate_key_illegal_characters",
    "test_tracestate_key_illegal_vendor_format",
    "test_tracestate_member_count_limit",
    "test_tracestate_key_length_limit",
    "test_tracestate_value_illegal_characters",
    "test_multiple_requests_with_valid_traceparent",
    "test_multiple_requests_without_traceparent",
    "test_multiple_requests_with_illegal_traceparent",
    "test_propagates_random_flag",
)
"""Every test of the W3C suite's test/test.py (TraceContextTest, AdvancedTest, TraceContext2Test)."""

_RESTATED: dict[str, str] = {}
Case = TypeVar("Case", bound=Callable[..., Awaitable[None]])


def restates(suite_case: str) -> Callable[[Case], Case]:
    """Marks a test as the restatement of ``suite_case``."""

    def mark(test: Case) -> Case:
        assert suite_case not in _RESTATED, f"{suite_case} is restated twice"
        _RESTATED[suite_case] = test.__name__
        return test

    return mark


# --- the suite's cases: traceparent --------------------------------------------------------------


@restates("test_both_traceparent_and_tracestate_missing")
async def test_a_request_without_trace_context_starts_a_trace(harness: Harness) -> None:
    got = await harness.one()
    assert got.tracestate_lines == ()


@restates("test_traceparent_included_tracestate_missing")
async def test_a_valid_traceparent_is_continued_under_a_new_parent_id(harness: Harness) -> None:
    got = await harness.assert_continues(("traceparent", SAMPLED))
    assert got.trace_flags & 1 == 1  # still sampled
    assert got.tracestate_lines == ()


@restates("test_traceparent_duplicated")
async def test_two_traceparent_headers_restart_the_trace(harness: Harness) -> None:
    other = "00-12345678901234567890123456789011-1234567890123456-01"
    got = await harness.one(("traceparent", other), ("traceparent", SAMPLED))
    assert got.trace_id not in (TRACE_ID, other[3:35])


@restates("test_traceparent_header_name")
async def test_misspelled_traceparent_names_are_not_read(harness: Harness) -> None:
    for name in ("trace-parent", "trace.parent"):
        got = await harness.one((name, SAMPLED))
        assert got.trace_id != TRACE_ID, name


@restates("test_traceparent_header_name_valid_casing")
async def test_the_traceparent_name_is_read_in_any_case(harness: Harness) -> None:
    for name in ("TraceParent", "TrAcEpArEnT", "TRACEPARENT"):
        await harness.assert_continues((name, SAMPLED))


@restates("test_traceparent_version_0x00")
async def test_version_00_followed_by_anything_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(SAMPLED + ".", SAMPLED + "-what-the-future-will-be-like")


@restates("test_traceparent_version_0xcc")
async def test_a_future_version_is_read_as_00_when_only_dash_led_fields_follow(harness: Harness) -> None:
    future = f"cc-{TRACE_ID}-{PARENT_ID}-01"
    for value in (future, future + "-what-the-future-will-be-like"):
        got = await harness.assert_continues(("traceparent", value))
        assert got.trace_flags == 1, value  # sent as version 00, which arrived() checks
    await harness.assert_restarts(future + ".what-the-future-will-be-like")


@restates("test_traceparent_version_0xff")
async def test_version_ff_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"ff-{TRACE_ID}-{PARENT_ID}-01")


@restates("test_traceparent_version_illegal_characters")
async def test_a_version_that_is_not_hex_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f".0-{TRACE_ID}-{PARENT_ID}-01", f"0.-{TRACE_ID}-{PARENT_ID}-01")


@restates("test_traceparent_version_too_long")
async def test_a_version_of_more_than_two_digits_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"000-{TRACE_ID}-{PARENT_ID}-01", f"0000-{TRACE_ID}-{PARENT_ID}-01")


@restates("test_traceparent_version_too_short")
async def test_a_version_of_one_digit_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"0-{TRACE_ID}-{PARENT_ID}-01")


@restates("test_traceparent_trace_id_all_zero")
async def test_an_all_zero_trace_id_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{'0' * 32}-{PARENT_ID}-01")


@restates("test_traceparent_trace_id_illegal_characters")
async def test_a_trace_id_that_is_not_hex_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-.{TRACE_ID[1:]}-{PARENT_ID}-01", f"00-{TRACE_ID[:-1]}.-{PARENT_ID}-01")


@restates("test_traceparent_trace_id_too_long")
async def test_a_trace_id_of_33_digits_restarts_the_trace(harness: Harness) -> None:
    value = f"00-{TRACE_ID}3-{PARENT_ID}-01"
    await harness.assert_restarts(value)
    got = await harness.one(("traceparent", value))
    assert got.trace_id not in (TRACE_ID, value[4:36])


@restates("test_traceparent_trace_id_too_short")
async def test_a_trace_id_of_31_digits_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01")


@restates("test_traceparent_parent_id_all_zero")
async def test_an_all_zero_parent_id_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{TRACE_ID}-{'0' * 16}-01")


@restates("test_traceparent_parent_id_illegal_characters")
async def test_a_parent_id_that_is_not_hex_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{TRACE_ID}-.{PARENT_ID[1:]}-01", f"00-{TRACE_ID}-{PARENT_ID[:-1]}.-01")


@restates("test_traceparent_parent_id_too_long")
async def test_a_parent_id_of_17_digits_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{TRACE_ID}-{PARENT_ID}7-01")


@restates("test_traceparent_parent_id_too_short")
async def test_a_parent_id_of_15_digits_restarts_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{TRACE_ID}-{PARENT_ID[:-1]}-01")


@restates("test_traceparent_trace_flags_illegal_characters")
async def test_flags_that_are_not_hex_restart_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{TRACE_ID}-{PARENT_ID}-.0", f"00-{TRACE_ID}-{PARENT_ID}-0.")


@restates("test_traceparent_trace_flags_too_long")
async def test_flags_of_three_digits_restart_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{TRACE_ID}-{PARENT_ID}-001")


@restates("test_traceparent_trace_flags_too_short")
async def test_flags_of_one_digit_restart_the_trace(harness: Harness) -> None:
    await harness.assert_restarts(f"00-{TRACE_ID}-{PARENT_ID}-1")


@restates("test_traceparent_ows_handling")
async def test_spaces_and_tabs_around_traceparent_are_ignored(harness: Harness) -> None:
    for value in (f" {SAMPLED}", f"\t{SAMPLED}", f"{SAMPLED} ", f"{SAMPLED}\t", f"\t {SAMPLED} \t"):
        await harness.assert_continues(("traceparent", value))


# --- the suite's cases: tracestate ---------------------------------------------------------------


@restates("test_tracestate_included_traceparent_missing")
async def test_tracestate_without_traceparent_is_discarded(harness: Harness) -> None:
    for value in ("foo=1", "foo=1,bar=2"):
        got = await harness.one(("tracestate", value))
        assert got.tracestate_lines == (), value


@restates("test_tracestate_included_traceparent_included")
async def test_tracestate_goes_on_with_the_trace(harness: Harness) -> None:
    got = await harness.assert_continues(("traceparent", UNSAMPLED), ("tracestate", "foo=1,bar=2"))
    assert got.tracestate == (("foo", "1"), ("bar", "2"))


@restates("test_tracestate_header_name")
async def test_misspelled_tracestate_names_are_not_read(harness: Harness) -> None:
    for name in ("trace-state", "trace.state"):
        got = await harness.assert_continues(("traceparent", UNSAMPLED), (name, "foo=1"))
        assert got.tracestate_lines == (), name


@restates("test_tracestate_header_name_valid_casing")
async def test_the_tracestate_name_is_read_in_any_case(harness: Harness) -> None:
    for name in ("TraceState", "TrAcEsTaTe", "TRACESTATE"):
        got = await harness.assert_continues(("traceparent", UNSAMPLED), (name, "foo=1"))
        assert got.state == {"foo": "1"}, name


@restates("test_tracestate_empty_header")
async def test_empty_tracestate_lines_are_accepted_and_none_is_sent(harness: Harness) -> None:
    got = await harness.assert_continues(("traceparent", UNSAMPLED), ("tracestate", ""))
    assert got.tracestate_lines == ()
    for lines in (["foo=1", ""], ["", "foo=1"]):
        got = await harness.assert_continues(("traceparent", UNSAMPLED), *[("tracestate", line) for line in lines])
        assert got.tracestate_lines == ("foo=1",), lines


@restates("test_tracestate_multiple_headers_different_keys")
async def test_tracestate_lines_are_combined_in_order(harness: Harness) -> None:
    lines = ["foo=1,bar=2", "rojo=1,congo=2", "baz=3"]
    got = await harness.assert_continues(("traceparent", UNSAMPLED), *[("tracestate", line) for line in lines])
    assert got.state_text == "foo=1,bar=2,rojo=1,congo=2,baz=3"


@restates("test_tracestate_duplicated_keys")
async def test_the_first_of_duplicated_keys_is_kept_with_the_rest(harness: Harness) -> None:
    for lines in (["foo=1,foo=1"], ["foo=1,foo=2"], ["foo=1", "foo=1"], ["foo=1", "foo=2"]):
        got = await harness.assert_continues(("traceparent", UNSAMPLED), *[("tracestate", line) for line in lines])
        assert got.tracestate_lines == ("foo=1",), lines


@restates("test_tracestate_all_allowed_characters")
async def test_every_character_the_grammar_allows_goes_on_unchanged(harness: Harness) -> None:
    key = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
    value = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",=")
    assert value[0] == " "  # a leading space is part of the value
    for sent_key in (key, key + "@a-z0-9_-*/"):
        got = await harness.assert_continues(("traceparent", UNSAMPLED), ("tracestate", f"{sent_key}={value}"))
        assert got.state == {sent_key: value}, sent_key


@restates("test_tracestate_ows_handling")
async def test_spaces_and_tabs_around_members_are_ignored(harness: Harness) -> None:
    for value in ("foo=1 \t , \t bar=2, \t baz=3", "foo=1\t \t,\t \tbar=2,\t \tbaz=3"):
        got = await harness.assert_continues(("traceparent", UNSAMPLED), ("tracestate", value))
        assert got.tracestate == (("foo", "1"), ("bar", "2"), ("baz", "3")), value
    for value in (" foo=1", "\tfoo=1", "foo=1 ", "foo=1\t", "\t foo=1 \t"):
        got = await harness.assert_continues(("traceparent", UNSAMPLED), ("tracestate", value))
        assert got.state == {"foo": "1"}, value


@restates("test_tracestate_key_illegal_characters")
async def test_a_key_outside_the_grammar_discards_tracestate(harness: Harness) -> None:
    await harness.assert_state_discarded("foo =1", "FOO=1", "foo.bar=1", "foo =1,bar=2")


@restates("test_tracestate_key_illegal_vendor_format")
async def test_at_signs_are_allowed_in_keys_but_not_first(harness: Harness) -> None:
    for key in ("foo@", "foo@@bar", "foo@bar@baz"):
        got = await harness.assert_continues(("traceparent", UNSAMPLED), ("tracestate", f"{key}=1,bar=2"))
        assert got.tracestate == ((key, "1"), ("bar", "2")), key
    await harness.assert_state_discarded("@foo=1,bar=2")


@restates("test_tracestate_member_count_limit")
async def test_32_members_go_on_and_33_discard_tracestate(harness: Harness) -> None:
    members = [f"bar{n:02d}={n:02d}" for n in range(1, 34)]
    lines = [",".join(members[i : i + 10]) for i in range(0, 30, 10)]
    for last, expected in ((",".join(members[30:32]), 32), (",".join(members[30:33]), 0)):
        sent = [("tracestate", line) for line in [*lines, last]]
        got = await harness.assert_continues(("traceparent", UNSAMPLED), *sent)
        assert len(got.tracestate) == expected, last
        if expected:
            assert got.state_text == ",".join(members[:32])


@restates("test_tracestate_key_length_limit")
async def test_keys_of_up_to_256_characters_go_on_and_longer_discard_tracestate(harness: Harness) -> None:
    for key in ("z" * 256, "t" * 241 + "@" + "v" * 14, "t" * 242 + "@v", "t@" + "v" * 15):
        got = await harness.assert_continues(
            ("traceparent", UNSAMPLED), ("tracestate", "foo=1"), ("tracestate", f"{key}=1")
        )
        assert got.tracestate == (("foo", "1"), (key, "1")), len(key)
    got = await harness.assert_continues(
        ("traceparent", UNSAMPLED), ("tracestate", "foo=1"), ("tracestate", "z" * 257 + "=1")
    )
    assert got.tracestate_lines == ()


@restates("test_tracestate_value_illegal_characters")
async def test_a_value_outside_the_grammar_discards_tracestate(harness: Harness) -> None:
    await harness.assert_state_discarded("foo=bar=baz", "foo=,bar=3")


# --- the suite's cases: several calls and Level 2 ------------------------------------------------


@restates("test_multiple_requests_with_valid_traceparent")
async def test_every_call_continues_the_trace_under_its_own_parent_id(harness: Harness) -> None:
    calls = await harness.send([("traceparent", SAMPLED)], calls=3)
    assert {got.trace_id for got in calls} == {TRACE_ID}
    assert len({got.parent_id for got in calls} - {PARENT_ID}) == 3


@restates("test_multiple_requests_without_traceparent")
async def test_every_call_of_a_new_trace_has_its_own_parent_id(harness: Harness) -> None:
    calls = await harness.send([], calls=3)
    assert len({got.trace_id for got in calls}) == 1  # one request, one trace
    assert len({got.parent_id for got in calls}) == 3


@restates("test_multiple_requests_with_illegal_traceparent")
async def test_every_call_of_a_restarted_trace_has_its_own_parent_id(harness: Harness) -> None:
    calls = await harness.send([("traceparent", f"00-{'0' * 32}-{PARENT_ID}-01")], calls=3)
    assert "0" * 32 not in {got.trace_id for got in calls}
    assert len({got.parent_id for got in calls}) == 3


@restates("test_propagates_random_flag")
async def test_the_random_trace_id_flag_goes_on_with_the_trace(harness: Harness) -> None:
    got = await harness.assert_continues(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-02"))
    assert got.trace_flags == 0x02


def test_every_case_of_the_suite_is_restated_once() -> None:
    assert len(SUITE_CASES) == len(set(SUITE_CASES)) == 41
    assert set(_RESTATED) == set(SUITE_CASES)


# --- traceparent, parsed alone -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SAMPLED, TraceParent(int(TRACE_ID, 16), int(PARENT_ID, 16), 0x01)),
        (f" \t{UNSAMPLED}\t ", TraceParent(int(TRACE_ID, 16), int(PARENT_ID, 16), 0x00)),
        (f"00-{TRACE_ID}-{PARENT_ID}-ff", TraceParent(int(TRACE_ID, 16), int(PARENT_ID, 16), 0x03)),
        (f"01-{TRACE_ID}-{PARENT_ID}-09-extra", TraceParent(int(TRACE_ID, 16), int(PARENT_ID, 16), 0x01)),
        (f"fe-{TRACE_ID}-{PARENT_ID}-02", TraceParent(int(TRACE_ID, 16), int(PARENT_ID, 16), 0x02)),
    ],
    ids=["sampled", "ows", "unknown-flags-cleared", "future-version-with-field", "version-fe"],
)
def test_valid_traceparents_are_read(value: str, expected: TraceParent) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01",
        f"00-{TRACE_ID}-{PARENT_ID}-0A",
        f"Cc-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-01,{SAMPLED}",
        f"cc-{TRACE_ID}-{PARENT_ID}-01,{SAMPLED}",
        f"cc-{TRACE_ID}-{PARENT_ID}-0",
        f"00_{TRACE_ID}_{PARENT_ID}_01",
        f"00-{TRACE_ID}-{PARENT_ID}-01\n",
        f"cc-{TRACE_ID}-{PARENT_ID}-01-" + "x" * 500,
        f"00-{TRACE_ID[:16]}{'g' * 16}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID} 01",
    ],
)
def test_invalid_traceparents_are_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_traceparent_is_written_as_version_00_with_known_flags_only() -> None:
    assert TraceParent(int(TRACE_ID, 16), int(PARENT_ID, 16), 0x03).to_header() == f"00-{TRACE_ID}-{PARENT_ID}-03"
    with pytest.raises(ValueError, match="trace-flags"):
        TraceParent(1, 1, 0x04)
    with pytest.raises(ValueError, match="non-zero"):
        TraceParent(0, 1, 0)


# --- tracestate, parsed and written alone --------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["a=1,b=2", "c=3"], (("a", "1"), ("b", "2"), ("c", "3"))),
        (["a=1,,  ,\t,b=2"], (("a", "1"), ("b", "2"))),
        (["a=1,a=2,b=3"], (("a", "1"), ("b", "3"))),
        (["1vendor=x,tenant@system=y,a@=z"], (("1vendor", "x"), ("tenant@system", "y"), ("a@", "z"))),
        (["a=  leading kept  "], (("a", "  leading kept"),)),
        (["a=" + "v" * 256], (("a", "v" * 256),)),
        ([",".join(f"k{n}=v" for n in range(32)) + "," * 40], tuple((f"k{n}", "v") for n in range(32))),
        (["", " "], ()),
    ],
    ids=["lines-combined", "empty-members", "first-duplicate", "new-key-grammar", "value-spaces", "value-256",
         "empty-members-not-counted", "nothing"],
)  # fmt: skip
def test_valid_tracestates_are_read(lines: list[str], expected: tuple[tuple[str, str], ...]) -> None:
    assert parse_tracestate(lines) == expected


@pytest.mark.parametrize(
    "line",
    [
        "a=1,b",
        "a=1,=2",
        "a=1,b=\t2",
        "a=1,b=x\ty",
        "a=" + "v" * 257,
        "a=caf\u00e9",
        "_a=1",
        "a=1,A=2",
        "a=1;b=2",
        ",".join(f"k{n}=v" for n in range(33)),
    ],
)
def test_one_invalid_member_discards_the_whole_tracestate(line: str) -> None:
    assert parse_tracestate(["ok=1", line]) == ()


def test_lines_that_are_not_text_are_ignored() -> None:
    assert parse_tracestate(["a=1", b"b=2", None, "c=3"]) == (("a", "1"), ("c", "3"))  # type: ignore[list-item]


def test_a_tracestate_too_long_to_send_loses_long_entries_first_then_from_the_end() -> None:
    long_entries = [(f"long{n}", "v" * 250) for n in range(10)]  # 256 characters each
    short_entries = [(f"s{n:02d}", "x" * 120) for n in range(22)]  # 124 characters each
    entries = [long_entries[0], *short_entries, *long_entries[1:]]
    header = format_tracestate(entries)
    assert len(header) <= MAX_TRACESTATE_CHARS
    kept = [member.partition("=")[0] for member in header.split(",")]
    # All the short entries fit (22 * 125 - 1 = 2749), so long ones go, right-most first, until it fits.
    assert kept[1:23] == [key for key, _ in short_entries]
    room = (MAX_TRACESTATE_CHARS - 2749) // 257
    assert kept == ["long0", *kept[1:23], *[f"long{n}" for n in range(1, room)]]
    only_short = format_tracestate([(f"s{n:02d}", "x" * 124) for n in range(32)])  # 32 * 129 - 1 = 4127
    assert only_short.split(",")[-1].startswith("s30=")


def test_what_is_sent_holds_no_invalid_entry_no_repeat_and_at_most_32() -> None:
    entries = [("Bad", "1"), ("a", "1"), ("a", "2"), *[(f"k{n}", "v") for n in range(40)]]
    header = format_tracestate(entries)
    assert header.startswith("a=1,k0=v,")
    assert len(header.split(",")) == 32


# --- W3CTraceState: why it exists, and that the SDK carries it -----------------------------------


def test_opentelemetrys_tracestate_drops_keys_the_current_grammar_allows() -> None:
    entries = [("foo@", "1"), ("1vendor", "2"), ("t" * 242 + "@v", "3"), ("bar", "4")]
    assert list(TraceState(entries).items()) == [("bar", "4")]
    assert list(W3CTraceState(entries).items()) == entries


def test_w3c_tracestate_changes_keep_its_grammar_and_its_type() -> None:
    state = W3CTraceState([("foo@", "1"), ("bar", "2")])
    added = state.add("1vendor", "3")
    assert isinstance(added, W3CTraceState)
    assert list(added.items()) == [("1vendor", "3"), ("foo@", "1"), ("bar", "2")]
    assert list(added.update("bar", "9").items()) == [("bar", "9"), ("1vendor", "3"), ("foo@", "1")]
    assert list(added.delete("foo@").items()) == [("1vendor", "3"), ("bar", "2")]
    assert added.add("foo@", "x") is added  # existing key
    assert added.add("@bad", "x") is added
    assert added.update("ok", "bad,value") is added
    assert added.to_header() == "1vendor=3,foo@=1,bar=2"
    assert W3CTraceState.from_header(["foo@=1,foo@=2", "bar=2"]) == {"foo@": "1", "bar": "2"}
    assert len(W3CTraceState([(f"k{n}", "v") for n in range(33)])) == 0  # as OpenTelemetry's


def test_w3c_tracestate_overrides_every_public_method_of_opentelemetrys() -> None:
    # An inherited method would read OpenTelemetry's empty store or re-apply its old grammar.
    public = {name for name in vars(TraceState) if not name.startswith("_")}
    dunders = {"__init__", "__contains__", "__getitem__", "__iter__", "__len__", "__repr__"}
    assert public | dunders <= set(vars(W3CTraceState))


def test_child_spans_of_the_sdk_keep_the_extracted_tracestate() -> None:
    context = DevstackTraceContextPropagator().extract({"traceparent": SAMPLED, "tracestate": "foo@=1,bar=2"})
    child = TRACER.start_span("child", context=context)
    state = child.get_span_context().trace_state
    assert isinstance(state, W3CTraceState)
    assert dict(state) == {"foo@": "1", "bar": "2"}
    carrier: dict[str, str] = {}
    DevstackTraceContextPropagator().inject(carrier, trace.set_span_in_context(child))
    assert carrier["tracestate"] == "foo@=1,bar=2"
    assert carrier["traceparent"].split("-")[1] == TRACE_ID


# --- the propagator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tracestate", "theirs", "ours"),
    [
        ("foo=1,foo=2", "", "foo=1"),
        ("foo@=1,bar=2", "", "foo@=1,bar=2"),
        ("foo=1," + "t" * 242 + "@v=1", "", "foo=1," + "t" * 242 + "@v=1"),
    ],
    ids=["duplicated-keys", "illegal-vendor-format", "key-length-limit"],
)
def test_the_three_strict_cases_opentelemetrys_propagator_fails(tracestate: str, theirs: str, ours: str) -> None:
    sent = {"traceparent": UNSAMPLED, "tracestate": tracestate}
    for propagator, expected in ((TraceContextTextMapPropagator(), theirs), (DevstackTraceContextPropagator(), ours)):
        state = trace.get_current_span(propagator.extract(sent)).get_span_context().trace_state
        assert state.to_header() == expected, type(propagator).__name__


def test_two_traceparent_values_from_a_getter_are_invalid() -> None:
    context = DevstackTraceContextPropagator().extract({"traceparent": [SAMPLED, SAMPLED]})
    assert not trace.get_current_span(context).get_span_context().is_valid


def test_extract_keeps_the_given_context_when_the_traceparent_is_invalid() -> None:
    base = trace.set_span_in_context(NonRecordingSpan(SpanContext(1, 2, is_remote=True)), Context())
    context = DevstackTraceContextPropagator().extract({"traceparent": "junk", "tracestate": "a=1"}, base)
    assert context is base


def test_inject_sends_nothing_without_a_valid_span_and_clears_unknown_flags() -> None:
    carrier: dict[str, str] = {}
    DevstackTraceContextPropagator().inject(carrier, Context())
    assert carrier == {}
    flags = TraceFlags(0xFF)
    span = NonRecordingSpan(SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), False, flags, TraceState()))
    DevstackTraceContextPropagator().inject(carrier, trace.set_span_in_context(span))
    assert carrier == {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-03"}


def test_the_sdk_carriers_round_trip_trace_context() -> None:
    headers = inject(dict[str, str](), extract({"traceparent": f" {SAMPLED}", "tracestate": ["a@=1", "b=2"]}))
    assert headers["traceparent"] == SAMPLED
    assert headers["tracestate"] == "a@=1,b=2"


_HEADER_TEXT = st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=80) | st.sampled_from(
    [SAMPLED, UNSAMPLED, "", "ff", "a=1", "a@=1,b=2", "=", ",", " "]
)


@FUZZ
@given(
    traceparent=st.none() | _HEADER_TEXT | st.lists(_HEADER_TEXT, max_size=3),
    tracestate=st.none() | _HEADER_TEXT | st.lists(_HEADER_TEXT, max_size=3),
)
def test_extract_never_raises_and_what_it_reads_is_sent_valid(
    traceparent: str | list[str] | None, tracestate: str | list[str] | None
) -> None:
    carrier = {name: value for name, value in (("traceparent", traceparent), ("tracestate", tracestate)) if value}
    context = DevstackTraceContextPropagator().extract(carrier)
    sent: dict[str, str] = {}
    DevstackTraceContextPropagator().inject(sent, context)
    if sent:
        # Whatever goes out reads back the same, in the suite's reading and in ours.
        got = arrived(list(sent.items()))
        assert parse_tracestate([sent.get("tracestate", "")]) == got.tracestate
        assert parse_traceparent(sent["traceparent"]) is not None
