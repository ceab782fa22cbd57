"""router._speedups.join_bytes answers exactly like ``b"".join`` (its Python original).

The response-head scan, the module's other function, is held to its original in
tests/test_http_rules.py. These tests need the C helper built (``make compile``).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
