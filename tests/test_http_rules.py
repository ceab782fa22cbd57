"""The response-head scan against an obviously-correct reference, field by field.

Two implementations are held to it: ``router.http.scan_response_head`` (Python, compiled or
not) and its C version in ``router._speedups`` (built with the compiled hot path), which must
also agree with the Python one on arbitrary bytes, errors included.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import http
from router._native import source
from router.http import TE_CHUNKED, TE_NONE, TE_OTHER
from tests.fuzz.expectations import HOP_BY_HOP as FUZZ_HOP_BY_HOP

try:
    from router import _speedups
except ImportError:  # not built: a pure-Python install
    _speedups = None  # type: ignore[assignment]

Scan = Callable[[bytes], tuple[int, int, int, bytes | None]]
needs_c = pytest.mark.skipif(_speedups is None, reason="router._speedups not built (make compile)")
SCANS = [
    pytest.param(http.scan_response_head, id="python"),
    pytest.param(getattr(_speedups, "scan_response_head", None), id="c", marks=needs_c),
]

# The fuzz suite's independent list (it also counts Content-Length, a framing field, not a
# hop-by-hop one for this purpose): the reference must not borrow the router's own table.
HOP = FUZZ_HOP_BY_HOP - {b"content-length"}


def reference(buf: bytes) -> tuple[int, int, int, bytes | None]:
    """The same answer computed the slow way: split into lines, look at every field."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return -1, -1, TE_NONE, None
    end += 4
    lines = buf[: end - 4].split(b"\r\n")
    kept = [lines[0]]
    content_length, coding, ok = -1, TE_NONE, lines[0].startswith(b"HTTP/1.1 ")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lower, value = name.lower(), value.strip(b" \t").lower()
        if lower == b"content-length":
            content_length = int(value)
        if lower == b"transfer-encoding":
            coding = TE_CHUNKED if value.endswith(b"chunked") else TE_OTHER
        if lower == b"keep-alive" or (lower == b"connection" and value in {b"close", b""}):
            continue
        if lower == b"connection" and value == b"keep-alive":
            kept.append(line)
            continue
        if lower in HOP:
            ok = False
        kept.append(line)
    return end, content_length, coding, b"\r\n".join(kept) + b"\r\n\r\n" if ok else None


NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 10:00:00 GMT\r\n"
    b'Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\nETag: "6-a"\r\n\r\n'
)


@pytest.mark.parametrize(
    ("head", "length", "coding", "forwarded"),
    [
        (NGINX, 6, TE_NONE, NGINX),
        (b"HTTP/1.1 204 No Content\r\n\r\n", -1, TE_NONE, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"HTTP/1.1 200 OK\r\nconnection:close\r\nkeep-alive: timeout=5\r\ncontent-length: 0\r\n\r\n", 0, TE_NONE,
         b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", -1, TE_CHUNKED, None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", -1, TE_OTHER, None),
        (b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 1\r\n\r\n", 1, TE_NONE, None),
        (b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\n", 1, TE_NONE, None),
        (b"HTTP/1.1 200 OK\r\nTE: trailers\r\nContent-Length: 1\r\n\r\n", 1, TE_NONE, None),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", 1, TE_NONE, None),
        # Names that merely start like a hop-by-hop field are ordinary fields.
        (b"HTTP/1.1 200 OK\r\nConnectionX: a\r\nTrailers-Seen: b\r\nContent-Length: 2\r\n\r\n", 2, TE_NONE,
         b"HTTP/1.1 200 OK\r\nConnectionX: a\r\nTrailers-Seen: b\r\nContent-Length: 2\r\n\r\n"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("scan", SCANS)
def test_scan_response_head(scan: Scan, head: bytes, length: int, coding: int, forwarded: bytes | None) -> None:
    body = b"abcdef"
    end, got_length, got_coding, passthrough = scan(head + body)
    assert (end, got_length, got_coding, passthrough) == (len(head), length, coding, forwarded)
    assert reference(head + body) == (end, got_length, got_coding, passthrough)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("fields", [0, 1, 38, 39, 40, 41, 100])
@pytest.mark.parametrize("body", [b"", b"\r\n", b"\r\n\r\n" * 50, b"x\r\n" * 100])
def test_scan_finds_the_end_of_long_heads_followed_by_bodies_full_of_crlf(scan: Scan, fields: int, body: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(fields))
    head += b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(body)
    got = scan(head + body)
    assert got == reference(head + body)
    assert got[0] == len(head) and got[1] == len(body)
    assert got[3] == head


@pytest.mark.parametrize("scan", SCANS)
def test_an_unfinished_head_has_no_end(scan: Scan) -> None:
    assert scan(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")[0] == -1
    assert scan(b"HTTP/1.1 200 OK")[0] == -1
    assert scan(b"HTTP/1.1 200 OK\r\n")[0] == -1
    long = b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 60
    assert scan(long)[0] == -1
    # Nothing of an unfinished head is looked at: not even a Content-Length int() would refuse.
    assert scan(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n") == (-1, -1, TE_NONE, None)


FIELD_NAMES = st.sampled_from(
    [
        b"Connection", b"connection", b"Keep-Alive", b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"TE",
        b"Trailer", b"Upgrade", b"Proxy-Connection", b"Proxy-Authenticate", b"Cache-Control", b"ETag", b"Tk", b"Up",
        b"Server", b"Date", b"Kept", b"Pragma", b"Via", b"uPgRaDe", b"content-length", b"CONTENT-TYPE", b"Content-Typo",
    ]
)  # fmt: skip
FIELD_VALUES = st.sampled_from([b"keep-alive", b"close", b"", b"chunked", b"gzip, chunked", b"x-other", b"1", b" 42 "])


@settings(max_examples=300, deadline=None)
@given(
    status=st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 101 Switching", b"HTTP/1.0 200 OK", b"HTTP/1.1 304 "]),
    fields=st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=8),
    body=st.binary(max_size=20),
)
@pytest.mark.parametrize("scan", SCANS)
def test_scan_agrees_with_the_reference(
    scan: Scan, status: bytes, fields: list[tuple[bytes, bytes]], body: bytes
) -> None:
    if sum(name.lower() == b"content-length" for name, _ in fields) > 1:
        return  # llhttp refuses these heads before the scan ever sees them
    fields = [(n, v if n.lower() != b"content-length" else b"7") for n, v in fields]
    head = status + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    assert scan(head + body) == reference(head + body)


# Arbitrary bytes, not only heads llhttp would accept: the C version must answer exactly like the
# Python one whatever it is handed, down to which inputs raise (a Content-Length int() refuses).
MESSY_NAMES = st.sampled_from(
    [
        b"Connection", b"CONNECTION", b"Keep-Alive", b"Content-Length", b"content-length", b"Transfer-Encoding", b"TE",
        b"Trailer", b"Upgrade", b"Proxy-Connection", b"proxy-authorization", b"Content-Type", b"Kx", b"u", b"Server",
        b"Connection ", b"Contentlength",
    ]
)  # fmt: skip
MESSY_VALUES = st.one_of(
    st.sampled_from(
        [
            b"close", b" keep-alive ", b"Keep-Alive", b"", b"\tclose\t", b" 12 ", b"+5", b"1_0", b"0012", b"-3", b"abc",
            b"99999999999999999999999", b"gzip, CHUNKED\t", b"chunkedx", b"x\ry", b"\xc3\xa9",
        ]
    ),
    st.binary(max_size=12),
)  # fmt: skip
MESSY_LINES = st.one_of(
    st.tuples(MESSY_NAMES, MESSY_VALUES).map(lambda nv: nv[0] + b":" + nv[1]),
    st.sampled_from([b"noColonLine", b"c", b"k:", b"Connection", b"\r", b"\n"]),
)


def _outcome(scan: Scan, buf: bytes) -> object:
    try:
        return scan(buf)
    except ValueError as exc:
        return type(exc)


@needs_c
@settings(max_examples=1500, deadline=None)
@given(
    status=st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1", b"", b"HTTP/1.1 200 \r"]),
    lines=st.lists(MESSY_LINES, max_size=40),
    tail=st.sampled_from([b"\r\n", b"", b"\r\nbody\r\n\r\nmore", b"\r\n" + b"x" * 1500]),
    cut=st.none() | st.integers(min_value=0, max_value=3000),
)
def test_the_c_scan_answers_exactly_like_the_python_one(
    status: bytes, lines: list[bytes], tail: bytes, cut: int | None
) -> None:
    buf = status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + tail
    if cut is not None:
        buf = buf[:cut]
    assert _outcome(_speedups.scan_response_head, buf) == _outcome(http.scan_response_head, buf)


@needs_c
def test_the_c_scan_keeps_every_cut_of_a_head_with_many_hop_by_hop_lines() -> None:
    # More cut lines than the C version keeps on its stack: it must grow, not give up.
    head = b"HTTP/1.1 200 OK\r\n" + b"Keep-Alive: 5\r\nX-K: v\r\n" * 40 + b"Content-Length: 0\r\n\r\n"
    got = _speedups.scan_response_head(head)
    assert got == http.scan_response_head(head) == reference(head)
    assert got[3] == b"HTTP/1.1 200 OK\r\n" + b"X-K: v\r\n" * 40 + b"Content-Length: 0\r\n\r\n"


@needs_c
def test_the_c_scan_refuses_what_is_not_bytes() -> None:
    with pytest.raises(TypeError):
        _speedups.scan_response_head(bytearray(b"HTTP/1.1 200 OK\r\n\r\n"))  # type: ignore[arg-type]


_C_SOURCE = source("_speedups")  # (a compiled module's __file__ does not name its folder)


def test_the_c_head_scan_looks_at_exactly_the_hop_by_hop_fields_of_its_original() -> None:
    # The C scan cannot import the Python list, so it repeats it; this holds the two equal.
    source = _C_SOURCE.read_text()
    named = {name.encode() for name in re.findall(r'lower_equals\(line, name_len, "([a-z-]+)"\)', source)}
    assert named == http.HOP_BY_HOP
    branch = r'else if \((lower_equals\(line, name_len, "[a-z-]+"\)\s*(\|\|\s*)?)+\)\s*\{\s*passthrough_ok = 0;'
    chain = re.search(branch, source)
    assert chain is not None, "the C scan's catch-all hop-by-hop branch moved: update this test"
    others = {name.encode() for name in re.findall(r'"([a-z-]+)"', chain.group(0))}
    assert others == http._HOP_OTHER
