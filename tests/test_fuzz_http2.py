"""Hypothesis fuzzing of the router's HTTP/2 front end with frames: well-formed requests on
several streams (keys alice, bob and none, bodies, trailers, streams left open) interleaved, with
random frames, flags, stream ids, lying lengths and garbage among them, sent in segments to the
request fuzz's router and recording origins (tests/fuzz/http2.py lists the invariants: no crash,
no stream's request or answer crossing to another stream, no hang, bounded state).

Profiles (``DEVSTACK_FUZZ_PROFILE``): ``ci`` (default: 200 examples, about 10 s) and ``long``
(5 000); ``DEVSTACK_FUZZ_H2_EXAMPLES`` overrides the count. Below the fuzz test: a regression
tests for the bugs it found, fixed.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from collections.abc import AsyncIterator, Iterator

import hpack
import pytest
from h2.errors import ErrorCodes
from hypothesis import HealthCheck, example, given, settings

from router.server import RouterServer
from router.settings import RouterSettings
from tests.fuzz.config import TIMEOUTS
from tests.fuzz.http2 import H2Case, H2Harness, Noise, Request, answered, h2_cases, read_streams
from tests.fuzz.origins import RecordingOrigin
from tests.support import (
    H2Type,
    H2Wire,
    h2_frame,
    h2_goaway,
    h2_header_block,
    h2_request_fields,
    h2_rst,
    h2_window_update,
    make_table,
    running_router,
)

PROFILE = os.environ.get("DEVSTACK_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"DEVSTACK_FUZZ_PROFILE must be 'ci' or 'long', not {PROFILE!r}")
_EXAMPLES = {"ci": 200, "long": 5000}
_SETTINGS = settings(
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# Every run covers these, whatever Hypothesis draws: three keys interleaved frame by frame, with
# bodies; a client reset and a server-side reset among them; garbage mid-connection.
_ALICE = Request(
    stream_id=1, authority=b"a", method=b"POST", baggage=b"devstack=alice", body=(b"a1", b"a2"), ending="data",
    content_length=True, block_frames=1,
)  # fmt: skip
_BOB = Request(
    stream_id=3, authority=b"a", method=b"PUT", baggage=b"devstack=bob", body=(b"b1", b"b2"), ending="trailers",
    content_length=False, block_frames=2,
)  # fmt: skip
_NONE = Request(
    stream_id=5, authority=b"a", method=b"GET", baggage=None, body=(), ending="headers", content_length=False,
    block_frames=1,
)  # fmt: skip
_INTERLEAVED = H2Case(
    requests=(_ALICE, _BOB, _NONE), order=(0, 1, 0, 1, 2, 0, 1, 1), noise=(), settings=(), dynamic=True, cuts=(),
    end="close",
)  # fmt: skip
_CLIENT_RESET = Noise("frame:RST_STREAM", h2_rst(1, ErrorCodes.CANCEL), stream_id=1, kind=H2Type.RST_STREAM)
_WINDOW_OVERFLOW = Noise(
    "frame:WINDOW_UPDATE", h2_window_update(3, 0x7FFFFFFF), stream_id=3, kind=H2Type.WINDOW_UPDATE
)  # the router resets stream 3 (FLOW_CONTROL_ERROR)
_RESETS = H2Case(
    requests=(_ALICE, _BOB, _NONE), order=(0, 1, 2, 0, 1, 0, 1, 1), noise=((3, _CLIENT_RESET), (4, _WINDOW_OVERFLOW)),
    settings=(), dynamic=False, cuts=(40,), end="goaway",
)  # fmt: skip
_GARBAGE = H2Case(
    requests=(_ALICE, _NONE), order=(0, 1, 0, 0), noise=((2, Noise("garbage", b"\x00\x00\x04\x00\xff", desyncs=True)),),
    settings=(), dynamic=False, cuts=(), end="abort",
)  # fmt: skip


@pytest.fixture(scope="module")
def h2_harness() -> Iterator[H2Harness]:
    h = H2Harness()
    h.start()
    yield h
    h.stop()


@pytest.mark.timeout(0 if PROFILE == "long" else 240)
def test_fuzz_http2_frames_keep_streams_apart(h2_harness: H2Harness, capsys: pytest.CaptureFixture[str]) -> None:
    examples = int(os.environ.get("DEVSTACK_FUZZ_H2_EXAMPLES", _EXAMPLES[PROFILE]))

    @settings(_SETTINGS, max_examples=examples)
    @given(case=h2_cases())
    @example(case=_INTERLEAVED)
    @example(case=_RESETS)
    @example(case=_GARBAGE)
    def run(case: H2Case) -> None:
        h2_harness.check_h2(case)

    try:
        run()
    finally:
        with capsys.disabled():
            sys.stdout.write("\n" + h2_harness.summary_h2(PROFILE) + "\n")
    assert h2_harness.tally["forwarded"] > 0


# -- bugs the fuzzer found, fixed since: regression tests ------------------------------------------


@pytest.fixture
async def recorded() -> AsyncIterator[tuple[RouterServer, RecordingOrigin]]:
    """A router on the fuzz's deadlines (keepalive_idle 1 s) fronting one recording origin."""
    origin = RecordingOrigin("baseline", itertools.count())
    await origin.start()
    try:
        settings = RouterSettings(timeouts=dataclasses.replace(TIMEOUTS, keepalive_idle=1.0))
        async with running_router(make_table({"a": {"baseline": origin.url}}), settings) as server:
            yield server, origin
    finally:
        await origin.close()


async def test_a_client_goaway_after_its_requests_leaves_nothing_held(
    recorded: tuple[RouterServer, RecordingOrigin],
) -> None:
    # Found by the fuzz (fixed with the engine interface, router/h2engine.py): h2 sends nothing
    # once it has received a GOAWAY, and the stream whose answer it refused stayed in
    # Http2Connection.streams with finished=True, so the connection neither answered nor closed,
    # and with a stream open _tick never applied keepalive_idle: a client could hold router
    # connections (up to max_client_connections) for as long as it liked. A client's GOAWAY
    # (RFC 9113 6.8) must leave its streams answered, or the connection closed at once.
    server, _ = recorded
    assert server.ctx is not None
    wire = await H2Wire.connect(server.address)
    block = hpack.Encoder().encode(h2_request_fields(b"a", b"/then-goaway"))
    wire.send(h2_header_block(1, block, end_stream=True) + h2_goaway(0, ErrorCodes.NO_ERROR))
    answered_or_closed = await wire.until(lambda w: 1 in answered(w.frames) or w.closed, 2.0)
    held = [getattr(c, "streams", None) for c in server.ctx.connections]
    wire.abort()
    assert answered_or_closed, f"2 s after the GOAWAY: no answer, the connection open, the router holds {held!r}"


# -- bugs the fuzzer found, fixed: regression tests ------------------------------------------------


async def test_a_request_body_that_stalls_is_the_clients_timeout_not_the_upstreams(
    recorded: tuple[RouterServer, RecordingOrigin],
) -> None:
    # The client sends part of a body and nothing more. Over HTTP/1.1 the router answers 408
    # body-read-timeout after body_idle. Over HTTP/2 no timer watches the client's body: the
    # upstream connection's own timer (idle_limit = body_idle while the body is pending) fires,
    # _Stream.upstream_failed takes UPSTREAM_TIMEOUT for the upstream's fault, answers 504
    # "timeout", counts devstack_upstream_errors{reason="timeout"} and reports the upstream as
    # failing (failure log, dashboard), though it was waiting for the client.
    server, _ = recorded
    wire = await H2Wire.connect(server.address)
    block = hpack.Encoder().encode(h2_request_fields(b"a", b"/upload", b"POST"))
    wire.send(h2_header_block(1, block, end_stream=False) + h2_frame(H2Type.DATA, 0, 1, b"part"))
    assert await wire.until(lambda w: 1 in answered(w.frames), TIMEOUTS.body_idle + 3)
    streams, _ = read_streams(wire.frames)
    wire.abort()
    errors = dict(server.stats.upstream_errors)
    assert (streams[1].field(b":status"), errors) == (b"408", {}), f"{streams[1].head!r}, upstream errors {errors!r}"
