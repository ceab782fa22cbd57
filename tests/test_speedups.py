"""router._speedups.join_bytes answers exactly like ``b"".join`` (its Python original).

The response-head scan, the module's other function, is held to its original in
tests/test_http_rules.py. These tests need the C helper built (``make compile``).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.h2upstream import head_fields_h2

try:
    from router import _speedups
except ImportError:  # not built: a pure-Python install
    _speedups = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(_speedups is None, reason="router._speedups not built (make compile)")


def _outcome(join: Any, pieces: object) -> object:
    try:
        return join(pieces)
    except TypeError as exc:
        return TypeError, str(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=40))
def test_a_list_of_bytes_joins_like_bytes_join(pieces: list[bytes]) -> None:
    assert _speedups.join_bytes(pieces) == b"".join(pieces)


class _Bytes(bytes):
    pass


@pytest.mark.parametrize(
    "pieces",
    [
        [],
        [b"only"],
        (b"a", b"b"),  # not a list: bytes.join itself
        [b"a", bytearray(b"b"), memoryview(b"c")],  # bytes-like pieces
        [_Bytes(b"sub"), b"class"],
        [b"a", "text"],  # refused the way bytes.join refuses it
        [b"a", None],
        "not a sequence of bytes",
        42,
    ],
)
def test_everything_else_answers_like_bytes_join(pieces: object) -> None:
    assert _outcome(_speedups.join_bytes, pieces) == _outcome(b"".join, pieces)


def test_one_piece_is_returned_as_itself_like_bytes_join() -> None:
    piece = b"x" * 100
    assert _speedups.join_bytes([piece]) is piece
    assert type(_speedups.join_bytes([])) is bytes


# -- head_fields_h2: an HTTP/1.1 request head as HTTP/2 fields (router.h2upstream.head_fields_h2) --

_HEAD_BYTES = st.sampled_from([b"a", b"B", b"Z", b"-", b" ", b"\t", b":", b"\r", b"\n", b"\r\n", b"\xff", b"\0"])
_SKIPS = st.frozensets(st.sampled_from([b"host", b"te", b"a", b"b", b"x-a", b""]), max_size=4)


@settings(max_examples=500, deadline=None)
@given(st.lists(_HEAD_BYTES, max_size=60).map(b"".join), _SKIPS)
def test_any_head_splits_like_its_python_original(head: bytes, skip: frozenset[bytes]) -> None:
    assert _speedups.head_fields_h2(head, skip) == head_fields_h2(head, skip)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.from_regex(rb"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True), st.binary(max_size=20)),
        max_size=12,
    ),
    _SKIPS,
)
def test_a_rendered_head_splits_like_its_python_original(
    fields: list[tuple[bytes, bytes]], skip: frozenset[bytes]
) -> None:
    head = b"POST /p?q=1 HTTP/1.1\r\n" + b"".join(n + b": " + v.replace(b"\r\n", b"") + b"\r\n" for n, v in fields)
    head += b"\r\n"
    ours = _speedups.head_fields_h2(head, skip)
    assert ours == head_fields_h2(head, skip)
    assert ours[0] == b"/p?q=1"


def test_head_fields_h2_examples() -> None:
    head = b"GET /x HTTP/1.1\r\nHost: web\r\nX-A:  padded \t\r\nTE: trailers\r\nno-colon\r\n\r\n"
    expected = (b"/x", [(b"x-a", b"padded"), (b"no-colon", b"")])
    assert (
        _speedups.head_fields_h2(head, frozenset({b"host", b"te"}))
        == expected
        == head_fields_h2(head, frozenset({b"host", b"te"}))
    )
    with pytest.raises(TypeError):
        _speedups.head_fields_h2(head, {b"host"})  # type: ignore[arg-type]
