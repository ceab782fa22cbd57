"""The W3C-exact baggage propagator, side by side with OpenTelemetry's, and the composite's configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat

from propagation import DevstackTraceContextPropagator, current_routing_key
from propagation.propagators import (
    MAX_BAGGAGE_BYTES,
    MAX_BAGGAGE_MEMBERS,
    BaggageMember,
    DevstackBaggagePropagator,
    baggage_properties,
    build_propagator,
    format_baggage,
    parse_baggage,
    percent_decode,
)
from router.keys import routing_key_from_baggage

OURS = DevstackBaggagePropagator()
OTEL = W3CBaggagePropagator()
ROOT = Path(__file__).resolve().parent.parent
# The autouse loop guard is function-scoped but holds no per-example state.
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300, deadline=None)


def ours(carrier: dict[str, str | list[str]]) -> Context:
    return OURS.extract(carrier, Context())


def otel(carrier: dict[str, str | list[str]]) -> Context:
    return OTEL.extract(carrier, Context())


def values(context: Context) -> dict[str, object]:
    return dict(baggage.get_all(context))


def injected(context: Context, propagator: DevstackBaggagePropagator | W3CBaggagePropagator = OURS) -> str:
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context)
    return carrier.get("baggage", "")


def filler(count: int, size: int) -> list[str]:
    """``count`` distinct members of exactly ``size`` bytes each."""
    return [f"f{i:04d}=" + "x" * (size - 6) for i in range(count)]


# --- each difference from OpenTelemetry's W3CBaggagePropagator, proven on both -------------------


def test_every_baggage_line_is_read_where_otel_reads_only_the_first() -> None:
    carrier: dict[str, str | list[str]] = {"baggage": ["team=payments", "devstack=alice"]}
    assert baggage.get_baggage("devstack", otel(carrier)) is None
    assert values(ours(carrier)) == {"team": "payments", "devstack": "alice"}


def test_properties_stay_out_of_the_value_where_otel_keeps_them_in_it() -> None:
    carrier: dict[str, str | list[str]] = {"baggage": "devstack=alice;ttl=5"}
    assert baggage.get_baggage("devstack", otel(carrier)) == "alice;ttl=5"
    context = ours(carrier)
    assert baggage.get_baggage("devstack", context) == "alice"
    assert baggage_properties("devstack", context) == ("ttl=5",)


def test_plus_stays_a_plus_where_otel_decodes_a_space() -> None:
    carrier: dict[str, str | list[str]] = {"baggage": "query=a+b"}
    assert baggage.get_baggage("query", otel(carrier)) == "a b"
    assert baggage.get_baggage("query", ours(carrier)) == "a+b"


def test_members_within_8192_bytes_are_kept_where_otel_drops_the_whole_header() -> None:
    members = ["devstack=alice", *filler(40, 250)]
    header = ",".join(members)
    assert len(header) > MAX_BAGGAGE_BYTES
    assert values(otel({"baggage": header})) == {}
    kept = values(ours({"baggage": header}))
    assert kept["devstack"] == "alice"
    assert len(kept) == 1 + (MAX_BAGGAGE_BYTES - len("devstack=alice")) // 251


def test_an_invalid_escape_drops_the_member_where_otel_keeps_it_undecoded() -> None:
    carrier: dict[str, str | list[str]] = {"baggage": "bad=%zz,devstack=alice"}
    assert baggage.get_baggage("bad", otel(carrier)) == "%zz"
    assert values(ours(carrier)) == {"devstack": "alice"}


def test_inject_percent_encodes_per_rfc3986_where_otel_form_encodes() -> None:
    context = baggage.set_baggage("query", "a b+c", Context())
    assert injected(context, OTEL) == "query=a+b%2Bc"
    assert injected(context) == "query=a%20b%2Bc"


def test_what_we_inject_reads_the_same_with_otel_and_with_ours() -> None:
    context = baggage.set_baggage("query", "a b+c/é", Context())
    header = injected(context)
    assert baggage.get_baggage("query", otel({"baggage": header})) == "a b+c/é"
    assert baggage.get_baggage("query", ours({"baggage": header})) == "a b+c/é"


# --- parsing rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("devstack=alice", {"devstack": "alice"}),
        (" devstack \t= alice ;ttl=5 ", {"devstack": "alice"}),
        ("a=1,,b=2,", {"a": "1", "b": "2"}),
        ("k=", {"k": ""}),
        ("k=%C3%A9t%C3%A9", {"k": "été"}),
        ("k=%ff", {"k": "\ufffd"}),
        ("k=100%25", {"k": "100%"}),
        ("k=%2", {}),
        ("k=a b", {}),
        ('k="quoted"', {}),
        ("k=a\\b", {}),
        ("na me=x,ok=1", {"ok": "1"}),
        ("=x,novalue,ok=1", {"ok": "1"}),
        ("k=été", {}),
    ],
)
def test_members_parse_by_the_w3c_grammar(header: str, expected: dict[str, str]) -> None:
    assert values(ours({"baggage": header})) == expected


def test_the_first_of_duplicate_members_wins_within_a_line_and_across_lines() -> None:
    assert values(ours({"baggage": "devstack=alice,devstack=bob"})) == {"devstack": "alice"}
    assert values(ours({"baggage": ["devstack=alice", "devstack=bob"]})) == {"devstack": "alice"}


def test_an_invalid_first_duplicate_leaves_the_name_out_as_the_router_does() -> None:
    assert values(ours({"baggage": "devstack=%zz,devstack=alice"})) == {}


def test_malformed_properties_are_dropped_and_the_member_kept() -> None:
    context = ours({"baggage": "devstack=alice;ttl = 5;bad prop;;flag"})
    assert baggage.get_baggage("devstack", context) == "alice"
    assert baggage_properties("devstack", context) == ("ttl=5", "flag")


def test_a_member_ending_exactly_at_8192_bytes_is_kept() -> None:
    members = filler(31, 255)
    last = "z=" + "y" * (MAX_BAGGAGE_BYTES - 31 * 256 - 2)
    header = ",".join([*members, last])
    assert len(header) == MAX_BAGGAGE_BYTES
    assert baggage.get_baggage("z", ours({"baggage": header})) is not None


def test_a_member_crossing_8192_bytes_is_dropped_whole() -> None:
    members = filler(31, 255)
    last = "z=" + "y" * (MAX_BAGGAGE_BYTES - 31 * 256 - 1)
    context = ours({"baggage": ",".join([*members, last])})
    assert baggage.get_baggage("z", context) is None
    assert len(values(context)) == 31


def test_the_byte_limit_counts_the_comma_that_joins_lines() -> None:
    first = ",".join(filler(31, 255))
    last = "z=" + "y" * (MAX_BAGGAGE_BYTES - 31 * 256 - 2)
    assert baggage.get_baggage("z", ours({"baggage": [first, last]})) is not None
    assert baggage.get_baggage("z", ours({"baggage": [first, last + "y"]})) is None


def test_only_the_first_180_members_are_read() -> None:
    context = ours({"baggage": ",".join(f"m{i}={i}" for i in range(MAX_BAGGAGE_MEMBERS + 1))})
    assert len(values(context)) == MAX_BAGGAGE_MEMBERS
    assert baggage.get_baggage(f"m{MAX_BAGGAGE_MEMBERS}", context) is None


def test_a_huge_header_is_read_only_up_to_the_limit() -> None:
    members = parse_baggage(["devstack=alice," + "k=v," * 5_000_000])
    assert members[0] == BaggageMember("devstack", "alice")
    assert len(members) == 2  # "k" repeats: first wins


def test_percent_decode_keeps_plus_and_rejects_malformed_escapes() -> None:
    assert percent_decode("a+b%2B%20") == "a+b+ "
    assert percent_decode("%4") is None
    assert percent_decode("%g0") is None


def test_extract_keeps_baggage_already_in_the_context_and_overrides_what_the_header_names() -> None:
    base = baggage.set_baggage("devstack", "bob", baggage.set_baggage("tenant", "t1", Context()))
    assert values(OURS.extract({"baggage": "devstack=alice"}, base)) == {"tenant": "t1", "devstack": "alice"}


def test_extract_without_a_baggage_header_returns_the_context_unchanged() -> None:
    base = baggage.set_baggage("tenant", "t1", Context())
    assert OURS.extract({}, base) is base
    assert OURS.extract({"baggage": "not a member"}, base) is base


# --- injection -----------------------------------------------------------------------------------


def test_properties_are_sent_on_while_the_value_is_unchanged() -> None:
    context = ours({"baggage": "a=1;p,devstack=alice;ttl=5"})
    assert injected(context) == "devstack=alice;ttl=5,a=1;p"
    changed = baggage.set_baggage("devstack", "bob", context)
    assert injected(changed) == "devstack=bob,a=1;p"
    assert baggage_properties("devstack", changed) == ()


def test_the_routing_member_is_injected_first() -> None:
    context = baggage.set_baggage("devstack", "alice", baggage.set_baggage("z", "1", Context()))
    assert injected(context) == "devstack=alice,z=1"


def test_inject_drops_members_that_do_not_fit_whole() -> None:
    context = Context()
    for i in range(40):
        context = baggage.set_baggage(f"f{i:04d}", "x" * 244, context)
    context = baggage.set_baggage("devstack", "alice", context)
    header = injected(context)
    assert len(header) <= MAX_BAGGAGE_BYTES
    assert header.startswith("devstack=alice,")
    assert all(len(member) == 250 for member in header.split(",")[1:])


def test_inject_writes_at_most_180_members() -> None:
    context = Context()
    for i in range(MAX_BAGGAGE_MEMBERS + 20):
        context = baggage.set_baggage(f"m{i}", "1", context)
    assert len(injected(context).split(",")) == MAX_BAGGAGE_MEMBERS


def test_inject_leaves_out_names_that_are_not_tokens_and_values_that_cannot_print() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    context = baggage.set_baggage("bad name", "x", baggage.set_baggage("ok", 7, Context()))
    context = baggage.set_baggage("broken", Unprintable(), context)
    assert injected(context) == "ok=7"


def test_inject_without_baggage_writes_no_header() -> None:
    carrier: dict[str, str] = {}
    OURS.inject(carrier, Context())
    assert carrier == {}


def test_format_baggage_never_writes_a_property_that_could_break_the_header() -> None:
    member = BaggageMember("k", "v", ("ok=1", "bad\r\nx: y", "a,b"))
    assert format_baggage([member]) == "k=v;ok=1"


# --- properties that must hold for any input -----------------------------------------------------


@FUZZ
@given(st.lists(st.text(), max_size=5))
def test_extract_never_raises_on_arbitrary_text(lines: list[str]) -> None:
    context = OURS.extract({"baggage": lines}, Context())
    for name, value in baggage.get_all(context).items():
        assert isinstance(name, str)
        assert isinstance(value, str)
        assert ";" not in name


@FUZZ
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=2000))
def test_extract_never_raises_on_one_arbitrary_header(header: str) -> None:
    OURS.extract({"baggage": header}, Context())


_TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~abcXYZ019", min_size=1, max_size=12)


@FUZZ
@given(st.dictionaries(_TOKEN, st.text(alphabet=st.characters(codec="utf-8"), max_size=30), max_size=10))
def test_any_baggage_survives_inject_then_extract(sent: dict[str, str]) -> None:
    context = Context()
    for name, value in sent.items():
        context = baggage.set_baggage(name, value, context)
    assert values(ours({"baggage": injected(context)})) == sent


_FRAGMENT = st.sampled_from(
    [
        b"devstack=alice",
        b" devstack \t= bob ;ttl=1",
        b"devstack=%61lice",
        b"devstack=%zz",
        b"devstack=Alice",
        b"devstack2=x",
        b"xdevstack=y",
        b"devstack",
        b"=",
        b"",
        b"devstack=al ice",
        b"devstack=\xc3\xa9",
        b"a=1;p",
    ]
) | st.binary(max_size=40)


@FUZZ
@given(st.lists(st.lists(_FRAGMENT, max_size=6).map(b",".join), max_size=4))
def test_the_sdk_and_the_router_agree_on_the_routing_key(lines: list[bytes]) -> None:
    # Carriers hand header bytes over decoded like this; the router reads the same bytes raw.
    context = OURS.extract({"baggage": [line.decode("utf-8", "surrogateescape") for line in lines]}, Context())
    assert current_routing_key(context) == routing_key_from_baggage(lines)


# --- the composite and OTEL_PROPAGATORS ---------------------------------------------------------


def kinds(configured: str | None) -> list[type]:
    return [type(p) for p in build_propagator(configured)._propagators]


def test_without_otel_propagators_the_composite_is_b3_then_our_trace_context_then_our_baggage() -> None:
    expected = [B3MultiFormat, B3SingleFormat, DevstackTraceContextPropagator, DevstackBaggagePropagator]
    assert kinds(None) == expected
    assert kinds("  ") == expected


def test_otel_propagators_names_ours_without_the_entry_points() -> None:
    assert kinds("devstack_tracecontext, devstack_baggage ,b3multi") == [
        DevstackTraceContextPropagator,
        DevstackBaggagePropagator,
        B3MultiFormat,
    ]


def test_otel_propagators_tracecontext_means_our_trace_context() -> None:
    # A drop-in with the current W3C grammar (propagation/tracecontext.py), so the name is ours.
    assert kinds("tracecontext") == [DevstackTraceContextPropagator]


def test_otel_propagators_none_disables_propagation() -> None:
    assert kinds("tracecontext,none") == []


def test_otel_propagators_baggage_still_means_opentelemetrys_own() -> None:
    assert kinds("baggage") == [W3CBaggagePropagator]


def test_an_unknown_otel_propagator_is_refused() -> None:
    with pytest.raises(ValueError, match="devstack_bagage"):
        build_propagator("tracecontext,devstack_bagage")


def run_python(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_process_wide_propagator_honours_otel_propagators() -> None:
    out = run_python(
        "import propagation; print([type(p).__name__ for p in propagation.PROPAGATOR._propagators])",
        {"OTEL_PROPAGATORS": "tracecontext,devstack_baggage"},
    )
    assert out == "['DevstackTraceContextPropagator', 'DevstackBaggagePropagator']"


def test_the_entry_points_let_opentelemetry_itself_load_ours(tmp_path: Path) -> None:
    # The entry points the pyproject declares, installed as a dist-info next to the checkout.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    ours = declared["opentelemetry_propagator"]
    assert set(ours) == {"devstack_baggage", "devstack_tracecontext"}
    dist = tmp_path / "devstack_propagator-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: devstack-propagator\nVersion: 0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in ours.items())
    (dist / "entry_points.txt").write_text(f"[opentelemetry_propagator]\n{lines}")
    out = run_python(
        """
        from opentelemetry import baggage, propagate, trace
        print([type(p).__name__ for p in propagate.get_global_textmap()._propagators])
        context = propagate.extract(
            {"baggage": ["a=1", "devstack=alice;ttl=5"], "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
             "tracestate": "vendor@=1"}
        )
        print(baggage.get_baggage("devstack", context))
        print(trace.get_current_span(context).get_span_context().trace_state.to_header())
        """,
        {
            "OTEL_PROPAGATORS": "devstack_tracecontext,devstack_baggage,b3multi",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        },
    )
    names = "['DevstackTraceContextPropagator', 'DevstackBaggagePropagator', 'B3MultiFormat']"
    assert out.splitlines() == [names, "alice", "vendor@=1"]
