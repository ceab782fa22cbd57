"""inject/extract on every header shape: dicts, multidicts, requests and urllib headers, pairs lists."""

from __future__ import annotations

import email.message
import http.client
import io
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import baggage, trace
from opentelemetry.context import Context, attach, detach
from requests.structures import CaseInsensitiveDict

from propagation import current_routing_key, extract, inject
from propagation.carriers import HEADERS_GETTER

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
OTHER_TRACEPARENT = "00-11111111111111111111111111111111-2222222222222222-01"
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200, deadline=None)


def trace_id(context: Context) -> str | None:
    span_context = trace.get_current_span(context).get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else None


def sent_context() -> Context:
    context = extract({"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
    context = baggage.set_baggage("devstack", "alice", context)
    return baggage.set_baggage("tenant", "a b", context)


def http_message(*lines: tuple[str, str]) -> http.client.HTTPMessage:
    raw = "".join(f"{name}: {value}\r\n" for name, value in lines) + "\r\n"
    return http.client.parse_headers(io.BytesIO(raw.encode("latin-1")))


# --- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Baggage": "devstack=alice", "TraceParent": TRACEPARENT}, id="dict, mixed case"),
        pytest.param({"BAGGAGE": ["devstack=alice"], "TRACEPARENT": [TRACEPARENT]}, id="dict of lists"),
        pytest.param(CIMultiDictProxy(CIMultiDict(baggage="devstack=alice", traceparent=TRACEPARENT)), id="multidict"),
        pytest.param(CaseInsensitiveDict({"bAgGaGe": "devstack=alice", "Traceparent": TRACEPARENT}), id="requests"),
        pytest.param(http_message(("Baggage", "devstack=alice"), ("Traceparent", TRACEPARENT)), id="urllib"),
        pytest.param([(b"baggage", b"devstack=alice"), (b"traceparent", TRACEPARENT.encode())], id="asgi pairs"),
        pytest.param([("Baggage", b"devstack=alice"), ("traceparent", TRACEPARENT.encode())], id="kafka pairs"),
        pytest.param({b"baggage": b"devstack=alice", "traceparent": TRACEPARENT}, id="amqp bytes"),
    ],
)
def test_extract_reads_every_header_shape_case_insensitively(headers: Any) -> None:
    context = extract(headers)
    assert current_routing_key(context) == "alice"
    assert trace_id(context) == TRACE_ID


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"baggage": ["team=a", "devstack=alice"]}, id="dict of lists"),
        pytest.param({"baggage": "team=a", "Baggage": "devstack=alice"}, id="dict, two capitalisations"),
        pytest.param(CIMultiDict([("baggage", "team=a"), ("BAGGAGE", "devstack=alice")]), id="multidict"),
        pytest.param(http_message(("baggage", "team=a"), ("baggage", "devstack=alice")), id="urllib"),
        pytest.param([(b"baggage", b"team=a"), (b"baggage", b"devstack=alice")], id="pairs"),
    ],
)
def test_extract_combines_every_line_of_a_header(headers: Any) -> None:
    assert dict(baggage.get_all(extract(headers))) == {"team": "a", "devstack": "alice"}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"traceparent": [TRACEPARENT, TRACEPARENT]}, id="same twice"),
        pytest.param({"traceparent": [TRACEPARENT, OTHER_TRACEPARENT]}, id="two different"),
        pytest.param(CIMultiDict([("traceparent", TRACEPARENT), ("TraceParent", TRACEPARENT)]), id="multidict"),
        pytest.param({"b3": [f"{TRACE_ID}-{SPAN_ID}-1", f"{TRACE_ID}-{SPAN_ID}-1"]}, id="b3 twice"),
    ],
)
def test_a_duplicated_trace_parent_is_invalid(headers: Any) -> None:
    assert trace_id(extract(headers)) is None


def test_a_single_b3_header_is_read() -> None:
    assert trace_id(extract({"B3": f"{TRACE_ID}-{SPAN_ID}-1"})) == TRACE_ID


def test_w3c_trace_context_wins_over_b3_when_both_are_present() -> None:
    headers = {"b3": f"{'1' * 32}-{SPAN_ID}-1", "traceparent": TRACEPARENT}
    assert trace_id(extract(headers)) == TRACE_ID


def test_tracestate_lines_are_combined() -> None:
    context = extract({"traceparent": TRACEPARENT, "tracestate": ["a=1", "b=2"]})
    state = trace.get_current_span(context).get_span_context().trace_state
    assert dict(state) == {"a": "1", "b": "2"}


def test_getter_keys_are_lower_case_and_unique() -> None:
    assert HEADERS_GETTER.keys({"Baggage": "a=1", "baggage": "b=2", "X-B3-TraceId": "1"}) == ["baggage", "x-b3-traceid"]


def test_extract_starts_from_an_empty_context_not_the_callers() -> None:
    token = attach(baggage.set_baggage("devstack", "bob"))
    try:
        assert current_routing_key(extract({})) is None
        assert current_routing_key(extract({}, context=None)) is None
    finally:
        detach(token)


class ExplodingHeaders:
    def items(self) -> Iterator[tuple[str, str]]:
        yield ("baggage", "devstack=alice")
        raise RuntimeError("broken carrier")


@pytest.mark.parametrize(
    "headers",
    [
        None,
        42,
        "baggage: devstack=alice",
        b"baggage",
        [1, 2, 3],
        [("baggage",)],
        [(None, "devstack=alice")],
        {"baggage": object()},
        {"baggage": None},
        {"baggage": [None, 3, b"\xff\xfe"]},
        {b"\xff": b"\xff", "traceparent": "\udcff"},
        {"baggage": "devstack=\udcff", "traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
        {"baggage": ",;=%" * 5000, "tracestate": "=" * 100_000, "traceparent": "x" * 100_000},
        ExplodingHeaders(),
    ],
)
def test_extract_never_raises_on_bad_input(headers: Any) -> None:
    context = extract(headers)
    assert current_routing_key(context) is None
    assert trace_id(context) is None


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["baggage", "Baggage", "traceparent", "tracestate", "b3", "x-b3-traceid", "other"]),
            st.text(max_size=200) | st.binary(max_size=200),
        ),
        max_size=8,
    )
)
def test_extract_never_raises_on_arbitrary_headers(pairs: list[tuple[str, str | bytes]]) -> None:
    extract(pairs)
    extract(dict(pairs))


# --- writing -------------------------------------------------------------------------------------


def test_inject_writes_trace_context_baggage_and_both_b3_forms_into_a_dict() -> None:
    headers = inject({}, sent_context())
    assert headers == {
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=1",
        "baggage": "devstack=alice,tenant=a%20b",
        "b3": f"{TRACE_ID}-{SPAN_ID}-1",
        "x-b3-traceid": TRACE_ID,
        "x-b3-spanid": SPAN_ID,
        "x-b3-sampled": "1",
    }


def test_inject_returns_the_headers_it_was_given() -> None:
    headers: dict[str, str] = {"accept": "*/*"}
    assert inject(headers, sent_context()) is headers
    assert headers["accept"] == "*/*"


def test_inject_uses_the_current_context_by_default() -> None:
    token = attach(sent_context())
    try:
        assert inject({})["baggage"] == "devstack=alice,tenant=a%20b"
    finally:
        detach(token)


def test_inject_replaces_every_capitalisation_of_a_header() -> None:
    headers = inject({"Baggage": "devstack=bob", "TRACEPARENT": OTHER_TRACEPARENT, "X-Other": "1"}, sent_context())
    assert sorted(k for k in headers if k.lower() in {"baggage", "traceparent"}) == ["baggage", "traceparent"]
    assert headers["baggage"].startswith("devstack=alice")
    assert headers["X-Other"] == "1"


def test_inject_into_a_multidict_leaves_one_line_per_header() -> None:
    headers = inject(CIMultiDict([("Baggage", "devstack=bob"), ("baggage", "x=1")]), sent_context())
    assert headers.getall("baggage") == ["devstack=alice,tenant=a%20b"]


def test_inject_into_requests_headers() -> None:
    headers = inject(CaseInsensitiveDict({"BAGGAGE": "devstack=bob"}), sent_context())
    assert headers["baggage"] == "devstack=alice,tenant=a%20b"
    assert len([k for k in headers if k.lower() == "baggage"]) == 1


def test_inject_into_an_email_message_leaves_one_line_per_header() -> None:
    headers = email.message.Message()
    headers["Baggage"] = "devstack=bob"
    headers["baggage"] = "x=1"
    inject(headers, sent_context())
    assert headers.get_all("baggage") == ["devstack=alice,tenant=a%20b"]


def test_inject_into_kafka_pairs_writes_bytes_and_replaces_old_lines() -> None:
    headers: list[tuple[str, bytes]] = [("Baggage", b"devstack=bob"), ("key", b"v")]
    inject(headers, sent_context())
    assert ("key", b"v") in headers
    assert [v for k, v in headers if k.lower() == "baggage"] == [b"devstack=alice,tenant=a%20b"]


def test_inject_with_nothing_to_send_leaves_headers_alone() -> None:
    assert inject({"baggage": "devstack=bob"}, Context()) == {"baggage": "devstack=bob"}


@pytest.mark.parametrize("headers", [(), "text", None, frozenset()])
def test_inject_never_raises_on_an_unwritable_carrier(headers: Any) -> None:
    assert inject(headers, sent_context()) is headers


def test_a_message_round_trips_through_a_queue() -> None:
    received = extract(dict(inject({}, sent_context())))
    assert current_routing_key(received) == "alice"
    assert baggage.get_baggage("tenant", received) == "a b"
    assert trace_id(received) == TRACE_ID
    assert inject({}, received) == inject({}, sent_context())
