"""Routing-key extraction: W3C baggage examples, our documented rules, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.keys import (
    MAX_BAGGAGE_BYTES,
    BaggageKeySource,
    is_valid_key,
    percent_decode,
    routing_key_from_baggage,
)


def key(*lines: bytes) -> str | None:
    return routing_key_from_baggage(lines)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # Examples in the shape of the W3C Baggage specification's own.
        ((b"userId=alice,serverNode=DF%2028,isProduction=false",), None),
        ((b"userId=alice,devstack=alice,isProduction=false",), "alice"),
        ((b"key1=value1;property1;property2, devstack = alice ; propertyKey=propertyValue",), "alice"),
        ((b"key1 = value1, devstack\t=\talice",), "alice"),
        ((b"devstack=al%69ce",), "alice"),
        # Lines combine in order (RFC 9110 5.3).
        ((b"a=1", b"devstack=alice"), "alice"),
        ((b"devstack=bob", b"devstack=alice"), "bob"),
        ((), None),
        ((b"",), None),
    ],
)
def test_w3c_shaped_examples(lines: tuple[bytes, ...], expected: str | None) -> None:
    assert routing_key_from_baggage(lines) == expected


def test_exact_member_name_match_only() -> None:
    assert key(b"devstack2=alice") is None
    assert key(b"xdevstack=alice") is None
    assert key(b"DEVSTACK=alice") is None
    assert key(b"devstack=alice2") == "alice2"


def test_properties_are_stripped() -> None:
    assert key(b"devstack=alice;ttl=30") == "alice"
    assert key(b"devstack=alice ;ttl=30;x") == "alice"


def test_plus_is_literal_and_therefore_not_a_label() -> None:
    assert key(b"devstack=a+b") is None
    assert key(b"devstack=a%2Bb") is None


def test_invalid_percent_encoding_gives_no_key() -> None:
    assert key(b"devstack=%zz") is None
    assert key(b"devstack=alice%") is None
    assert key(b"devstack=alice%4") is None


def test_decoded_value_must_be_a_dns_label() -> None:
    assert key(b"devstack=Alice") is None
    assert key(b"devstack=-alice") is None
    assert key(b"devstack=alice-") is None
    assert key(b"devstack=" + b"a" * 63) == "a" * 63
    assert key(b"devstack=" + b"a" * 64) is None
    assert key(b"devstack=alice%0d%0aX-Injected:%201") is None
    assert key(b"devstack=") is None


def test_first_member_wins_even_when_invalid() -> None:
    assert key(b"devstack=alice,devstack=bob") == "alice"
    assert key(b"devstack=%zz,devstack=alice") is None


def test_members_past_the_w3c_byte_limit_are_not_read() -> None:
    pad = b"pad=" + b"x" * (MAX_BAGGAGE_BYTES - len(b"pad=") - len(b",devstack=alice"))
    assert key(pad + b",devstack=alice") == "alice"
    assert key(pad + b"x,devstack=alice") is None
    assert key(b"pad=" + b"x" * 8300, b"devstack=alice") is None


def test_members_past_the_member_limit_are_not_read() -> None:
    many = b",".join(b"m%d=v" % i for i in range(179))
    assert key(many + b",devstack=alice") == "alice"
    assert key(many + b",extra=1,devstack=alice") is None


def test_aliases_in_precedence_order() -> None:
    source = BaggageKeySource(["devstack", "sd-routing-key"])
    assert source.key_from([b"sd-routing-key=bob"]) == "bob"
    assert source.key_from([b"sd-routing-key=bob,devstack=alice"]) == "alice"
    assert source.key_from([b"other=1"]) is None


def test_member_names_must_be_tokens() -> None:
    with pytest.raises(ValueError, match="token"):
        BaggageKeySource(["dev stack"])


def test_percent_decode_is_rfc3986_not_form_decoding() -> None:
    assert percent_decode(b"a+b") == b"a+b"
    assert percent_decode(b"a%20b") == b"a b"
    assert percent_decode(b"%") is None


def test_is_valid_key() -> None:
    assert is_valid_key(b"alice")
    assert is_valid_key(b"pr-1234")
    assert not is_valid_key(b"")
    assert not is_valid_key(b"a_b")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_never_raises_on_arbitrary_bytes(lines: list[bytes]) -> None:
    result = routing_key_from_baggage(lines)
    assert result is None or is_valid_key(result.encode())


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
    st.lists(st.from_regex(r"[a-z]{1,8}=[a-z0-9]{0,8}", fullmatch=True), max_size=6),
    st.sampled_from([b"", b" ", b"\t", b"  \t"]),
)
def test_key_found_wherever_the_member_stands(value: str, others: list[str], ows: bytes) -> None:
    members = [m.encode() for m in others if not m.startswith("devstack=")]
    for position in range(len(members) + 1):
        line = members[:position] + [ows + b"devstack" + ows + b"=" + ows + value.encode() + ows] + members[position:]
        assert routing_key_from_baggage([b",".join(line)]) == value


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True), st.sampled_from(["devstack2", "xdevstack", "devstac", "Devstack"])
)
def test_similar_names_never_match(value: str, name: str) -> None:
    assert routing_key_from_baggage([f"{name}={value}".encode()]) is None


def test_joining_comma_between_lines_is_counted_once() -> None:
    # 31 members of 255 bytes + a 256-byte member: exactly 8192 bytes combined, on one line or two.
    members = [b"m%02d=" % i + b"x" * (255 - 4) for i in range(31)]
    last = b"devstack=alice;p=" + b"y" * (256 - len(b"devstack=alice;p="))
    one_line = b",".join([*members, last])
    assert len(one_line) == MAX_BAGGAGE_BYTES
    assert key(one_line) == "alice"
    assert key(b",".join(members), last) == "alice"


def test_cached_answers_equal_fresh_ones_and_the_cache_stays_bounded() -> None:
    source = BaggageKeySource()
    values = [b"devstack=alice", b"devstack=%zz", b"a=1,devstack=bob;p", b"x=1"]
    first = [source.key_from([v]) for v in values]
    again = [source.key_from([v]) for v in values]
    assert first == again == ["alice", None, "bob", None]
    for i in range(BaggageKeySource.cache_size * 2):
        source.key_from([b"devstack=k%d" % i])
    assert len(source._cache) <= BaggageKeySource.cache_size
    assert source.key_from([b"devstack=alice"]) == "alice"
