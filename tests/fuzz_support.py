"""Machinery for tests/test_fuzz.py's request fuzz: request generators, a reference parser,
recording origins, a response splitter, and the per-example exchange with its invariants.

One router and two recording origins run for the whole module on a uvloop loop in a background
thread (``Harness``); each Hypothesis example is a coroutine submitted to that loop. Nothing is
mocked: every example is real bytes over loopback TCP. The connection-lifecycle fuzz
(tests/fuzz_lifecycle.py) builds on this harness and these origins, which hold each WebSocket
upgrade on TUNNEL_PATH for its test to answer (``HeldUpgrade``, ``PeerEnd``); this module never
depends on it.

The invariants checked per example (``Harness.check``), all against independent parses:

1. no crash: a control request to each origin still gets its 200 afterwards, the router's
   connection counters return to zero and its event loop was never blocked for a second;
2. no hang: the client's exchange ends (all answers in, or the router closes) within the
   router's own deadline for that situation plus slack;
3. well-framed answers: the client's bytes split into complete HTTP/1.1 responses (httptools'
   response parser, HEAD-aware), one per request at most, in order; refusals close;
4. nothing smuggled: every request an origin parsed from what the router forwarded equals the
   request the reference parser (httptools on the client's raw bytes) found at the same position
   — method, origin-form path, body and every end-to-end header; the origin never sees more
   requests than the reference accepted, never one the router refused (4xx), and every
   forwarded head and body is strictly framed (CRLF only, one Host, exactly one of
   Content-Length or chunked when there is a body, chunked re-encoded canonically);
5. routing: ``baggage: devstack=alice`` reaches the alice origin, everything else the baseline.

Every bug this suite found is fixed and pinned by a regression test in test_fuzz.py, so it runs
strict by default; ``DEVSTACK_FUZZ_STRICT=0`` tolerates and counts the KNOWN_BUGS patterns instead
(for bisecting an old commit).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import itertools
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

import httptools
import uvloop
from hypothesis import strategies as st

from router.server import RouterServer
from router.settings import RouterSettings, Timeouts
from tests.support import make_table

T = TypeVar("T")

STRICT = os.environ.get("DEVSTACK_FUZZ_STRICT", "1") == "1"
"""Fail on the known bugs too (for checking a fix), instead of counting them."""

TIMEOUTS = Timeouts(header_read=1, body_idle=1, upstream_response=2, keepalive_idle=3)
"""Small deadlines so timeouts are exercised quickly. keepalive_idle is small too (a stalled
connection ends in 3 s, not 75) but well apart from header_read, so the two can be told apart."""
TIMER_SLACK = 1.0
"""Seconds past a router timer before the exchange counts as late (a loaded 2-core box)."""
SLACK = 2.0
"""Seconds past the longest deadline before we stop waiting and call the exchange hung."""
PATIENCE = max(TIMEOUTS.keepalive_idle, TIMEOUTS.upstream_response) + SLACK

KNOWN_BUGS = {
    "queued-malformed-forwarded": "a pipelined request whose body turns out malformed while it waits in the queue "
    "is forwarded anyway and answered 408 after body_idle, not 400",
    "head-answer-body": "the router's answers to HEAD decided before it reads the method (505, HTTP/0.9) carry a body",
}
"""Open bugs the fuzzer tolerates (and counts); fixed ones are plain regression tests in test_fuzz.py."""

# -- request generation ----------------------------------------------------------------------
# A request is valid unless it draws an "oddity": at most one per request (two sometimes), so
# most unmutated requests are forwarded and each odd one isolates one kind of trouble. Byte-level
# mutations (``mutations``) then break valid requests in ways no list anticipates.

_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VALUE_BYTES = bytes(range(0x20, 0x7F)) + b"\t"

METHODS = [b"GET"] * 6 + [b"POST"] * 5 + [b"PUT", b"HEAD", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"]
ODD_METHODS = [b"CONNECT", b"get", b"PRI", b"M-SEARCH", b"G\x00T", b"GET\t", b"", b"PROPFIND", b"GE T"]
TARGETS = [b"/", b"/x?y=1", b"/a/b/../c", b"/x#frag", b"/%00", b"//a", b"http://a/abs?q=1", b"http://A:80",
           b"HTTP://a?x", b"http://b/"]  # fmt: skip
ODD_TARGETS = [b"http://169.254.169.254/latest", b"http://u@a/", b"https://a/", b"*", b"a", b"/\xff", b"/a b",
               b"", b"/\x00", b"http://", b"http://a b/"]  # fmt: skip
ODD_VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"", b"HTTP/1.", b"HTTP/0.9"]
HOSTS = [b"a"] * 8 + [b"a:8080", b"A", b"b"]
ODD_HOSTS = [b"a@b", b"a b", b"", b"[::1]", b"a\tb", b"a, a", b"a/b", b"a\xff"]
BAGGAGE = [b"devstack=alice", b"devstack=alice", b"devstack=bob", b"devstack=alice;ttl=30", b"k=v,devstack=alice",
           b"devstack=%zz", b"devstack=%61lice", b"devstack=alice,devstack=bob", b"devstack = alice",
           b"devstack=ALICE", b"devstack=alice%0d%0aX-Injected:%201", b"devstack="]  # fmt: skip
SPECIAL_HEADERS = [
    (b"Connection", b"close"), (b"Connection", b"keep-alive"), (b"Connection", b"Upgrade"),
    (b"Connection", b"x-drop, close"), (b"Connection", b"x-drop"), (b"X-Drop", b"must-not-arrive"),
    (b"Connection", b"baggage, host, content-length, x-drop"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
    (b"Trailer", b"X-T"), (b"Upgrade", b"websocket"), (b"Proxy-Connection", b"keep-alive"),
    (b"x-devstack-route", b"forged"), (b"x-devstack-debug", b"1"), (b"X-Forwarded-For", b"1.2.3.4"),
    (b"X-Forwarded-Host", b"evil"), (b"X-Forwarded-Proto", b"https"), (b"Expect", b"100-continue"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), (b"Accept", b"*/*"),
    (b"Cookie", b"a=b; c=d"), (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
]  # fmt: skip
ODD_SEPARATORS = [b":", b":\t", b":  ", b" : ", b" :", b"\t: ", b": \t ", b"::"]
ODD_VALUES = [b"v\x00alue", b"v\ralue", b"v\x7f", b"\x80\xff", b"caf\xc3\xa9", b"a\x0bb", b"\x1b[31m"]
ODD_EOLS = [b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\r"]
TE_VALUES = [b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"gzip, chunked", b"chunked, identity", b"identity",
             b"chunked,chunked", b"\tchunked", b"chunk", b"", b"chunked;q=1"]  # fmt: skip
CHUNK_STYLES = ["HEX", "zeros", "0x", "plus", "minus", "lead-space", "trail-space", "ext", "ext-quoted", "huge",
                "underscore", "empty", "ext-space"]  # fmt: skip
LAST_CHUNKS = [b"0\r\nX-T: 1\r\n\r\n", b"0\r\nContent-Length: 50\r\n\r\n", b"0\r\nTransfer-Encoding: chunked\r\n\r\n",
               b"00\r\n\r\n", b"0;x=y\r\n\r\n", b"0\r\n", b"0\r\n\r", b"0\n\n", b"0\r\n \r\n"]  # fmt: skip
INTERESTING = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"0", b"9", b"a", b"\xff", b"\x7f",
               b"\x0b", b"-", b"+", b"\r\n\r\n", b"\r\n ", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n",
               b"Host: a\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]  # fmt: skip
ODD_CHANCE = st.sampled_from([False] * 3 + [True] * 2)
ODDITIES = ["method", "target", "version", "host", "no-host", "two-hosts", "separator", "value", "eol", "bare-lf",
            "obs-fold", "cl-value", "two-cl", "te-value", "two-te", "cl-and-te", "chunk-size", "chunk-crlf",
            "last-chunk", "many-headers", "long-target", "big-header", "big-baggage"]  # fmt: skip


def _cl_variants(n: int) -> list[bytes]:
    return [b"%d" % (n + 1), b"%d" % max(n - 1, 0), b"+%d" % n, b"-1", b"0x%x" % n, b"%d, %d" % (n, n),
            b"%d,%d" % (n, n + 1), b" %d" % n, b"%d " % n, b"0%d" % n, b"99999999999999999999",
            b"18446744073709551615", b"", b"1e2", b"%d\x00" % n]  # fmt: skip


def _chunk_size(size: int, style: str) -> bytes:
    return {
        "hex": b"%x" % size,
        "HEX": b"%X" % size,
        "zeros": b"000%x" % size,
        "0x": b"0x%x" % size,
        "plus": b"+%x" % size,
        "minus": b"-%x" % size,
        "lead-space": b" %x" % size,
        "trail-space": b"%x " % size,
        "ext": b"%x;ext=1" % size,
        "ext-quoted": b'%x;e="a;b"' % size,
        "ext-space": b"%x ; e" % size,
        "huge": b"ffffffffffffffffffff",
        "underscore": b"_%x" % size,
        "empty": b"",
    }[style]


def _chunked(draw: st.DrawFn, data: bytes, odd: set[str]) -> bytes:
    sizes = draw(st.lists(st.integers(1, 24), max_size=4))
    chunks, pos = [], 0
    for size in sizes:
        if pos < len(data):
            chunks.append(data[pos : pos + size])
            pos += size
    if pos < len(data):
        chunks.append(data[pos:])
    which = draw(st.integers(0, max(len(chunks) - 1, 0)))
    style = draw(st.sampled_from(CHUNK_STYLES)) if "chunk-size" in odd else "hex"
    encoded = []
    for i, chunk in enumerate(chunks):
        end = b"" if "chunk-crlf" in odd and i == which else b"\r\n"
        encoded.append(_chunk_size(len(chunk), style if i == which else "hex") + b"\r\n" + chunk + end)
    encoded.append(draw(st.sampled_from(LAST_CHUNKS)) if "last-chunk" in odd else b"0\r\n\r\n")
    return b"".join(encoded)


_header_name = st.one_of(
    st.sampled_from([b"X-A", b"x-b", b"User-Agent", b"Accept-Language", b"X-Request-Id"]),
    st.text(alphabet=_TOKEN, min_size=1, max_size=12).map(str.encode),
)
_header_value = st.one_of(
    st.sampled_from([b"v", b"", b"a b", b"  padded  ", b"\tx", b"x\t", b"a,b", b'"q"']),
    st.binary(max_size=24).map(lambda v: bytes(c for c in v if c in _VALUE_BYTES)),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """One HTTP/1.1 request: valid, or with one (sometimes two) oddities in its syntax or framing."""
    odd = set(draw(st.lists(st.sampled_from(ODDITIES), min_size=1, max_size=2))) if draw(ODD_CHANCE) else set()
    pick = st.sampled_from
    method = draw(pick(ODD_METHODS) if "method" in odd else pick(METHODS))
    target = draw(
        pick(ODD_TARGETS)
        if "target" in odd
        else st.one_of(
            pick(TARGETS), st.text(alphabet="abcz019/?=&%._-~", max_size=16).map(lambda s: b"/" + s.encode())
        )
    )
    if "long-target" in odd:
        target = b"/" + b"t" * draw(pick([16000, 17000]))
    version = draw(pick(ODD_VERSIONS)) if "version" in odd else b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = []
    if "no-host" not in odd:
        hosts = draw(pick(ODD_HOSTS)) if "host" in odd else draw(pick(HOSTS))
        headers.append((draw(pick([b"Host", b"Host", b"host", b"HOST"])), hosts))
        if "two-hosts" in odd:
            headers.append((b"Host", draw(pick([b"a", b"b"]))))
    headers += [(b"baggage", value) for value in draw(st.lists(pick(BAGGAGE), max_size=2))]
    headers += draw(st.lists(pick(SPECIAL_HEADERS), max_size=3))
    headers += draw(st.lists(st.tuples(_header_name, _header_value), max_size=3))
    if "value" in odd:
        headers.append((b"X-Odd", draw(pick(ODD_VALUES))))
    if "many-headers" in odd:
        headers += [(b"X-%d" % i, b"v") for i in range(draw(st.integers(95, 110)))]
    if "big-header" in odd:
        headers.append((b"X-Big", b"x" * draw(pick([20000, 33000]))))
    if "big-baggage" in odd:
        headers.append((b"baggage", b"pad=" + b"x" * 8300 + b",devstack=alice"))

    # framing: none, Content-Length or chunked; odd values, duplicates and combinations on demand
    data = draw(st.one_of(st.binary(max_size=48), st.binary(max_size=48), st.binary(min_size=200, max_size=3000)))
    chunked_odd = {"te-value", "two-te", "chunk-size", "chunk-crlf", "last-chunk"} & odd
    kind = "chunked" if chunked_odd else "cl" if {"cl-value", "two-cl"} & odd else draw(pick(["none", "cl", "chunked"]))
    if "cl-and-te" in odd:
        kind = "both"
    body = b""
    if kind == "none":
        data = b""
    elif kind == "cl":
        body = data
        headers.append(
            (b"Content-Length", draw(pick(_cl_variants(len(data)))) if "cl-value" in odd else b"%d" % len(data))
        )
        if "two-cl" in odd:
            headers.append((b"Content-Length", draw(pick([b"%d" % len(data), b"%d" % (len(data) + 1)]))))
    else:
        body = _chunked(draw, data, odd)
        headers.append((b"Transfer-Encoding", draw(pick(TE_VALUES)) if "te-value" in odd else b"chunked"))
        if "two-te" in odd:
            headers.append((b"Transfer-Encoding", draw(pick([b"chunked", b"identity"]))))
        if kind == "both":
            headers.append((b"Content-Length", b"%d" % len(data)))

    order = draw(st.permutations(range(len(headers))))
    lines = [method + b" " + target + (b" " + version if version else b"")]
    seps = [b": "] * len(headers)
    if "separator" in odd and headers:
        seps[draw(st.integers(0, len(headers) - 1))] = draw(pick(ODD_SEPARATORS))
    lines += [headers[i][0] + seps[i] + headers[i][1] for i in order]
    if "obs-fold" in odd:
        lines.insert(draw(st.integers(1, len(lines))), draw(pick([b" folded", b"\tfolded", b" "])))
    ends = [b"\n" if "bare-lf" in odd else b"\r\n"] * (len(lines) + 1)
    if "eol" in odd:
        ends[draw(st.integers(0, len(lines)))] = draw(pick(ODD_EOLS))
    return b"".join(line + end for line, end in zip(lines, ends)) + ends[-1] + body


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, int, bytes]:
    kind = draw(st.sampled_from(["insert", "insert", "delete", "replace", "dup-line", "truncate"]))
    where = draw(st.integers(0, 1 << 20))
    if kind == "insert":
        return kind, where, draw(st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=3)))
    if kind == "delete":
        return kind, where, b"x" * draw(st.integers(1, 4))
    if kind == "replace":
        return kind, where, draw(st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=1)))
    return kind, where, b""


def mutate(raw: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    for kind, where, data in ops:
        if not raw:
            break
        pos = where % (len(raw) + (kind == "insert"))
        if kind == "insert":
            raw = raw[:pos] + data + raw[pos:]
        elif kind == "delete":
            raw = raw[:pos] + raw[pos + len(data) :]
        elif kind == "replace":
            raw = raw[:pos] + data + raw[pos + len(data) :]
        elif kind == "truncate":
            raw = raw[: max(pos, 1)]
        else:  # duplicate one CRLF-terminated line (a header, usually)
            lines = raw.split(b"\r\n")
            i = where % len(lines)
            raw = b"\r\n".join(lines[: i + 1] + lines[i:])
    return raw


@dataclasses.dataclass(frozen=True)
class Case:
    raw: bytes
    cuts: tuple[int, ...]
    """Offsets where the bytes are split into separately sent segments."""
    half_close: bool
    """Shut down the client's write side after sending (the router may then drop pending work)."""
    mutated: bool

    def segments(self) -> list[bytes]:
        bounds = [0, *sorted({c % (len(self.raw) + 1) for c in self.cuts}), len(self.raw)]
        return [self.raw[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def __repr__(self) -> str:  # what Hypothesis prints for a falsifying example
        return f"Case(raw={self.raw!r}, cuts={self.cuts!r}, half_close={self.half_close!r})"


@st.composite
def cases(draw: st.DrawFn) -> Case:
    parts = draw(st.lists(requests(), min_size=1, max_size=3))
    ops = draw(st.one_of(st.just([]), st.lists(mutations(), min_size=1, max_size=3)))
    raw = mutate(b"".join(parts), ops)
    cuts = tuple(draw(st.lists(st.integers(0, 1 << 20), max_size=2)))
    half_close = draw(st.sampled_from([True] * 5 + [False] * 3))
    return Case(raw, cuts, half_close, bool(ops))


# -- reference parse of the client's bytes -----------------------------------------------------


@dataclasses.dataclass
class Message:
    method: bytes = b""
    url: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    keep_alive: bool = True
    upgrade: bool = False
    head_done: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


class _Collector:
    """httptools callbacks gathering whole messages."""

    def __init__(self) -> None:
        self.parser: Any = None
        self.current: Message | None = None
        self.done: list[Message] = []
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.current = Message()
        self._body = []

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        if not self.current.url:
            self.current.method = self.parser.get_method()
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.current is not None and not self.current.head_done:  # trailers are not headers
            # Whitespace after a value is not part of it (RFC 9110 5.5); llhttp keeps it. The
            # router trims it from Host, the value it judges; every other field goes byte-exact.
            if name.lower() == b"host":
                value = value.rstrip(b" \t")
            self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.head_done = True
        self.current.method = self.parser.get_method()
        self.current.version = self.parser.get_http_version()
        self.current.upgrade = self.parser.should_upgrade()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.body = b"".join(self._body)
        self.current.keep_alive = self.parser.should_keep_alive()
        self.done.append(self.current)
        self.current = None


_LIMIT_STATUSES: Final = frozenset({413, 414, 431})


@dataclasses.dataclass
class Reference:
    requests: list[Message]
    """Complete requests, in order."""
    partial: Message | None
    """A request begun but not finished when the bytes ran out."""
    error: str | None
    failed: Message | None
    """The request being parsed when the error hit (its head may be complete)."""
    upgraded: bool

    @property
    def last(self) -> Message | None:
        """The request after the complete ones: the partial or the failed one."""
        return self.partial or self.failed

    def is_head(self, i: int, status: int | None = None) -> bool:
        """Whether response ``i`` (of ``status``, once its head is read) answers a HEAD request, so
        carries no body. For the request after the complete ones this is known if its head was
        whole, or if a size limit (413/414/431) stopped it after its request line: the router
        answers such a well-formed-so-far request by its method, even if a byte further on would
        have made it unparseable."""
        if i < len(self.requests):
            return self.requests[i].method == b"HEAD"
        last = self.last
        if i != len(self.requests) or last is None or last.method != b"HEAD":
            return False
        return last.head_done or status in _LIMIT_STATUSES

    @property
    def cut(self) -> int | None:
        """Index of the first request after which the connection cannot carry more requests."""
        for i, req in enumerate(self.requests):
            if not req.keep_alive or req.upgrade:
                return i
        return None


TUNNELLED: Final = frozenset({b"websocket"})
"""README "WebSockets": the Upgrade protocols the router tunnels by default."""


def upgrade_protocols(values: list[bytes]) -> list[bytes]:
    """The protocol names of ``Upgrade`` values, lower case, versions stripped (``websocket/13``)."""
    return [t.strip(b" \t").partition(b"/")[0].lower() for v in values for t in v.split(b",")]


def tunnels(req: Message) -> bool:
    """Whether the router opens a tunnel for a request llhttp upgrades: HTTP/1.1 only, and only
    for an allowed protocol; any other Upgrade is dropped and the request goes on as a plain one."""
    return req.version == "1.1" and any(t in TUNNELLED for t in upgrade_protocols(req.header(b"upgrade")))


def _declares_body(req: Message) -> bool:
    lengths = req.header(b"content-length")
    return bool(req.header(b"transfer-encoding")) or any(v.strip() not in (b"", b"0") for v in lengths)


def reference_parse(raw: bytes) -> Reference:
    collector = _Collector()
    error: str | None = None
    upgraded = False
    offset = 0
    while True:
        parser = httptools.HttpRequestParser(collector)
        collector.parser = parser
        try:
            parser.feed_data(raw[offset:])
        except httptools.HttpParserUpgrade as exc:
            last = collector.done[-1] if collector.done else None
            if last is not None and last.upgrade and not tunnels(last) and not _declares_body(last):
                # A refused Upgrade: forwarded plainly, and what follows is parsed afresh.
                last.upgrade = False
                offset += exc.args[0]
                if offset < len(raw):
                    continue
            else:
                upgraded = True
        except httptools.HttpParserError as exc:
            error = str(exc) or type(exc).__name__
        break
    partial = collector.current if error is None and not upgraded else None
    failed = collector.current if error is not None else None
    return Reference(collector.done, partial, error, failed, upgraded)


# -- recording origins -----------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    origin: str
    seq: int
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    peer: bytes
    """The client address the router appended to X-Forwarded-For: which example sent it."""

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


_TOKEN_RE = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN_RE + rb" [\x21-\x7e\x80-\xff]+ HTTP/1\.1")
_FIELD_LINE = re.compile(rb"(" + _TOKEN_RE + rb"): ?([\t\x20-\x7e\x80-\xff]*)")
_CHUNK_SIZE = re.compile(rb"([0-9a-f]+)\r\n")


def strict_framing_problems(head: bytes, body: bytes) -> list[str]:
    """What is wrong with a request head and body as the router forwarded them (strict RFC 9112)."""
    problems = []
    if not head.endswith(b"\r\n\r\n"):
        return [f"forwarded head does not end in CRLF CRLF: {head[-20:]!r}"]
    lines = head[:-4].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        problems.append("bare CR or LF in the forwarded head")
    if not _REQUEST_LINE.fullmatch(lines[0]):
        problems.append(f"forwarded request line is not strict: {lines[0][:80]!r}")
    names = []
    cl: list[bytes] = []
    te: list[bytes] = []
    for line in lines[1:]:
        m = _FIELD_LINE.fullmatch(line)
        if m is None:
            problems.append(f"forwarded field line is not strict: {line[:80]!r}")
            continue
        name = m.group(1).lower()
        names.append(name)
        if name == b"content-length":
            cl.append(m.group(2))
        elif name == b"transfer-encoding":
            te.append(m.group(2))
        elif name.startswith(b"x-devstack-"):
            problems.append(f"forwarded a router header: {line[:80]!r}")
    if names.count(b"host") != 1:
        problems.append(f"forwarded {names.count(b'host')} Host lines")
    if cl and te:
        problems.append("forwarded both Content-Length and Transfer-Encoding")
    if len(cl) > 1 or len(te) > 1:
        problems.append(f"forwarded framing headers repeated: CL={cl!r} TE={te!r}")
    if te and te[0] != b"chunked":
        problems.append(f"forwarded Transfer-Encoding {te[0]!r}")
    if cl and not cl[0].isdigit():
        problems.append(f"forwarded Content-Length {cl[0]!r}")
    if te:
        pos = 0
        while True:
            m = _CHUNK_SIZE.match(body, pos)
            if m is None:
                problems.append(f"forwarded chunked body not canonical at {pos}: {body[pos : pos + 20]!r}")
                break
            size = int(m.group(1), 16)
            pos = m.end()
            if size == 0:
                if body[pos:] != b"\r\n":
                    problems.append(f"forwarded last chunk not followed by bare CRLF: {body[pos:][:20]!r}")
                break
            if body[pos + size : pos + size + 2] != b"\r\n":
                problems.append("forwarded chunk data not followed by CRLF")
                break
            pos += size + 2
    elif cl and cl[0].isdigit() and int(cl[0]) != len(body):
        problems.append(f"forwarded Content-Length {cl[0]!r} but {len(body)} body bytes")
    elif not cl and body:
        problems.append("forwarded a body without framing")
    return problems


class _OriginConnection(asyncio.Protocol):
    """Parses what the router forwards one byte at a time, so every message's exact bytes are known."""

    def __init__(self, origin: RecordingOrigin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.stream = bytearray()
        """Bytes received since ``base`` (the offset of stream[0]); trimmed after each message."""
        self.base = 0
        self.offset = 0
        self.done = False
        self.served = 0
        """Requests parsed on this connection so far: more than one means the router reused it."""
        self.held: HeldUpgrade | None = None
        """A WebSocket upgrade on TUNNEL_PATH waiting for the test's answer."""
        self.early = bytearray()
        """Bytes after a held upgrade's head: the router must keep them until our 101."""
        self.tunnel: PeerEnd | None = None
        """This origin's end of the tunnel once it has sent its 101."""
        self._new_parser()

    def _new_parser(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.start = self.head_end = self.offset
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.in_head = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.origin.connections += 1
        self.origin.live.add(self)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.on_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.origin.live.discard(self)
        if self.tunnel is not None:
            self.tunnel.lost = True

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.received += data
            return
        if self.held is not None:
            self.early += data
            return
        self.stream += data
        for i in range(len(data)):
            if self.done:
                return
            try:
                self.parser.feed_data(data[i : i + 1])
            except httptools.HttpParserUpgrade:
                if self.held is not None:
                    # Whatever follows the held head is tunnel data, not another request.
                    self.offset += 1
                    rest = data[i + 1 :]
                    self.early += rest
                    if rest:
                        del self.stream[-len(rest) :]
                    return
                self._new_parser()  # we answered 200, not 101: the connection stays HTTP
            except httptools.HttpParserError as exc:
                self.origin.problems.append(
                    f"origin {self.origin.name} could not parse forwarded bytes ({exc}): "
                    f"{bytes(self.stream[max(self.start - self.base, 0) : self.offset + 1 - self.base])[-300:]!r}"
                )
                assert self.transport is not None
                self.transport.abort()
                return
            self.offset += 1

    def on_message_begin(self) -> None:
        self.start = self.offset
        self.url = b""
        self.headers = []
        self.body = []
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_end = self.offset + 1

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        origin = self.origin
        base = self.base
        head = bytes(self.stream[self.start - base : self.head_end - base])
        raw_body = bytes(self.stream[self.head_end - base : self.offset + 1 - base])
        del self.stream[: self.offset + 1 - base]
        self.base = self.offset + 1
        xff = [v for k, v in self.headers if k.lower() == b"x-forwarded-for"]
        peer = xff[-1].rsplit(b",", 1)[-1].strip() if xff else b""
        seq = next(origin.counter)
        method = self.parser.get_method()
        record = Record(origin.name, seq, method, self.url, self.headers, b"".join(self.body), peer)
        origin.records.append(record)
        self.served += 1
        problems = strict_framing_problems(head, raw_body)
        framed = any(
            k.lower() == b"transfer-encoding" or (k.lower() == b"content-length" and v != b"0") for k, v in self.headers
        )
        if self.parser.should_upgrade() and framed:
            # httptools (here as in the router) takes what follows an Upgrade head for tunnel data,
            # so a framing header on one promises a body nobody forwards (fixed: now refused, 400).
            # What follows the head is undefined for us too: answer, then close.
            problems = [f"Upgrade request forwarded with body framing: {head[-200:]!r}"]
            self.done = True
        for problem in problems:
            origin.problems.append(f"origin {origin.name} request #{seq} from {peer!r}: {problem}")
        if self.url == TUNNEL_PATH and self.parser.should_upgrade() and not self.done:
            protocols = upgrade_protocols([v for k, v in self.headers if k.lower() == b"upgrade"])
            if b"websocket" in protocols:
                # A WebSocket server's upgrade: held until the test answers (HeldUpgrade).
                self.held = HeldUpgrade(self, record, reused=self.served > 1)
                origin.held.append(self.held)
                return
        response = b"HTTP/1.1 200 OK\r\nx-origin: %s\r\nx-seq: %d\r\ncontent-length: 2\r\n\r\n" % (
            origin.name.encode(),
            seq,
        )
        assert self.transport is not None
        self.transport.write(response if method == b"HEAD" else response + b"ok")
        if self.done:
            self.transport.close()


class RecordingOrigin:
    """A raw TCP origin: records every request it parses and answers each with a small 200."""

    def __init__(self, name: str, counter: itertools.count[int]) -> None:
        self.name = name
        self.counter = counter
        self.records: list[Record] = []
        self.problems: list[str] = []
        self.hits: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self.live: set[_OriginConnection] = set()
        """Connections open on our side (closed by us or by the router: gone)."""
        self.held: list[HeldUpgrade] = []
        """Upgrade requests on TUNNEL_PATH, held for the test to answer, in arrival order."""
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        """The router's pool key for this origin (``UpstreamPool.idle_count``)."""
        return ("127.0.0.1", self.port)

    def plain_open(self) -> int:
        """Open connections speaking HTTP: the only kind an idle pooled connection may be."""
        return sum(1 for conn in self.live if conn.tunnel is None and conn.held is None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _OriginConnection(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# -- the origins' WebSocket side: held upgrades and tunnel ends ---------------------------------

TUNNEL_PATH: Final = b"/__ws"
"""Where the recording origins speak WebSocket (holding each upgrade for the test to answer). No
generated request names it (their paths have no "w"), so the request fuzz keeps its plain 200s."""
_SWITCHING: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
_DECLINED: Final = b"HTTP/1.1 403 Forbidden\r\nx-origin: %s\r\ncontent-length: 8\r\n\r\ndeclined"


def _reset(transport: asyncio.Transport) -> None:
    """Close with RST: SO_LINGER 0 makes the kernel reset the connection instead of sending FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class PeerEnd:
    """One end of a connection that a test drives (the client, or an origin once it has sent its
    101): every byte it got and where EOF came, and its own FIN or RST. A FIN received leaves its
    own side open (a half-close is a message, not the end); once both directions are done it closes."""

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self.transport = transport
        self.received = bytearray()
        self.sent = bytearray()
        self.eof_at: int | None = None
        """len(received) when EOF arrived; None while the other side may still send."""
        self.lost = False
        self.fin_sent = False
        self.rst_sent = False
        self.rst_after_fin = False
        """Reset after its own FIN: the router, which reads no more after an EOF, learns of it only
        when it next writes to this end (or the other end finishes too)."""

    @property
    def ended(self) -> bool:
        """This end sends nothing more."""
        return self.fin_sent or self.rst_sent or self.lost

    def _writable(self) -> asyncio.Transport | None:
        transport = self.transport
        if transport is None or self.ended or transport.is_closing():
            return None
        return transport

    def send(self, data: bytes) -> bool:
        transport = self._writable()
        if transport is None:
            return False
        self.sent += data
        transport.write(data)
        return True

    def fin(self) -> bool:
        transport = self._writable()
        if transport is None:
            return False
        transport.write_eof()
        self.fin_sent = True
        if self.eof_at is not None:
            transport.close()  # both directions are done
        return True

    def rst(self) -> bool:
        transport = self.transport
        if transport is None or self.rst_sent or self.lost or transport.is_closing():
            return False
        _reset(transport)
        self.rst_after_fin = self.fin_sent
        self.rst_sent = True
        return True

    def on_eof(self) -> bool:
        self.eof_at = len(self.received)
        return not self.fin_sent  # False: both directions are done and the transport closes

    def discard(self) -> None:
        """The example is over: drop whatever is still open on the test's side."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class HeldUpgrade:
    """A WebSocket upgrade an origin received and holds unanswered until the test answers it."""

    def __init__(self, conn: _OriginConnection, record: Record, *, reused: bool) -> None:
        self.conn = conn
        self.record = record
        self.reused = reused
        """The router sent it on a connection that had carried a request before (from its pool)."""

    def _answerable(self) -> asyncio.Transport | None:
        conn = self.conn
        conn.held = None
        if conn.early:
            conn.origin.problems.append(
                f"the router forwarded {len(conn.early)} tunnel bytes before the origin's answer: "
                f"{bytes(conn.early)[:60]!r}"
            )
        transport = conn.transport
        return transport if transport is not None and not transport.is_closing() else None

    def accept(self, first: bytes) -> PeerEnd:
        """Answer 101 (with ``first`` tunnel bytes in the same write); the connection is a tunnel."""
        transport = self._answerable()
        end = self.conn.tunnel = PeerEnd(transport)
        end.received += self.conn.early
        if transport is None:
            end.lost = True
            return end
        end.sent += first
        transport.write(_SWITCHING + first)
        return end

    def decline(self) -> None:
        """Answer 403 and stay HTTP, as a WebSocket server refusing the handshake does."""
        transport = self._answerable()
        if transport is None:
            return
        self.conn._new_parser()
        transport.write(_DECLINED % self.conn.origin.name.encode())
        if self.conn.early:
            transport.close()  # what the router sent after the head is not ours to parse

    def reset(self) -> None:
        transport = self._answerable()
        if transport is not None:
            _reset(transport)

    def close(self) -> None:
        transport = self._answerable()
        if transport is not None:
            transport.close()


# -- the client's view: splitting the response stream ------------------------------------------


@dataclasses.dataclass
class Response:
    status: int
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    head_only: bool

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def origin(self) -> str | None:
        values = self.header(b"x-origin")
        return values[0].decode() if values else None

    @property
    def closes(self) -> bool:
        return any(b"close" in v.lower() for v in self.header(b"connection"))


class _ResponseCollector:
    def __init__(self) -> None:
        self.parser: Any = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.head_done = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def split_responses(
    data: bytes, is_head: Callable[[int, int | None], bool], hits: collections.Counter[str]
) -> tuple[list[Response], str | None]:
    """Responses in ``data`` (HEAD answers end with their head); (responses, problem or None)."""
    out: list[Response] = []
    pos = 0
    while pos < len(data):
        head_only = is_head(len(out), None)
        status_known = False
        collector = _ResponseCollector()
        parser = httptools.HttpResponseParser(collector)
        collector.parser = parser
        end = None
        for i in range(pos, len(data)):
            try:
                parser.feed_data(data[i : i + 1])
            except httptools.HttpParserError as exc:
                return out, f"response #{len(out)} does not parse ({exc}) at {data[pos : i + 1][-120:]!r}"
            if collector.head_done and not status_known:
                # Once, as the head ends: a limit status can make the answer head-only.
                status_known = True
                head_only = head_only or is_head(len(out), parser.get_status_code())
            if collector.complete or (head_only and collector.head_done):
                end = i + 1
                break
        if end is None:
            return out, f"response #{len(out)} is truncated: {data[pos:][:200]!r}"
        response = Response(
            parser.get_status_code(), parser.get_http_version(), collector.headers, b"".join(collector.body), head_only
        )
        out.append(response)
        pos = end
        if head_only and response.origin is None and response.closes and not STRICT:
            # Known bug "head-answer-body": some of the router's own answers to HEAD (those decided
            # before it reads the method: 505, HTTP/0.9) still carry their JSON body. They close
            # the connection, so no later response is misread; skip the body to check the rest.
            length = response.header(b"content-length")
            if length and length[0].isdigit() and int(length[0]) and data[pos : pos + 1] == b"{":
                hits["head-answer-body"] += 1
                pos += int(length[0])
    return out, None


class _Client(asyncio.Protocol):
    """The fuzzing client: keeps every byte it received even when the router resets."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.wake = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.wake.set()

    def eof_received(self) -> bool:
        self.closed = True
        self.wake.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.wake.set()


# -- expectations --------------------------------------------------------------------------

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
NEVER_STRIPPED = frozenset({b"host", b"content-length", b"transfer-encoding", b"baggage", b"traceparent", b"tracestate",
                            b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled",
                            b"x-b3-flags"})  # fmt: skip
"""README "Forwarding": names a Connection header may not strip."""


def split_target(url: bytes) -> tuple[bytes | None, bytes]:
    """(authority from an absolute-form target or None, the origin-form path to forward)."""
    if url[:7].lower() != b"http://":
        return None, url
    rest = url[7:]
    m = re.search(rb"[/?#]", rest)
    end = m.start() if m else len(rest)
    path = rest[end:]
    return rest[:end], path if path.startswith(b"/") else b"/" + path


ROUTER_OWNED = HOP_BY_HOP | {b"host", b"forwarded", b"traceparent", b"baggage", b"expect", b"http2-settings"}
"""Names the router sets, reads or drops itself: a client's underscore spelling of one (which
CGI-style backends fold into it) is dropped too (README "Forwarding")."""


def end_to_end(headers: list[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in dropped
        and lower not in HOP_BY_HOP
        and lower not in (b"forwarded", b"http2-settings")
        and not (folded := lower.replace(b"_", b"-")).startswith((b"x-forwarded-", b"x-devstack-"))
        and not (b"_" in lower and folded in ROUTER_OWNED)
    ]


def connection_listed(req: Message) -> frozenset[bytes]:
    tokens = {t.strip(b" \t").lower() for v in req.header(b"connection") for t in v.split(b",")}
    return frozenset(tokens - {b""} - NEVER_STRIPPED)


def expected_origin(req: Message) -> str | None:
    """Where a request's baggage should take it, by the README's rules; None when not obvious."""
    lines = req.header(b"baggage")
    if not lines:
        return "baseline"
    joined = b",".join(lines)
    if len(joined) > 4096:
        return None
    for member in joined.split(b","):
        name, eq, value = member.partition(b"=")
        if not eq or name.strip(b" \t") != b"devstack":
            continue
        value = value.split(b";", 1)[0].strip(b" \t")
        if b"%" in value:
            return None
        return "alice" if value == b"alice" else "baseline"
    return "baseline"


def compare(req: Message, rec: Record, index: int) -> list[str]:
    """Differences between the reference's request and what the origin parsed from the router."""
    problems = []
    authority, path = split_target(req.url)
    if rec.method != req.method:
        problems.append(f"method {req.method!r} arrived as {rec.method!r}")
    if rec.url != path:
        problems.append(f"target {req.url!r} arrived as {rec.url!r} (expected {path!r})")
    if rec.body != req.body:
        problems.append(f"body {req.body[:80]!r} ({len(req.body)} B) arrived as {rec.body[:80]!r} ({len(rec.body)} B)")
    dropped = connection_listed(req) | ({b"host"} if authority is not None else frozenset())
    sent, seen = end_to_end(req.headers, dropped), end_to_end(rec.headers, dropped)
    if sent != seen:
        problems.append(f"end-to-end headers differ: sent {sent!r}, origin saw {seen!r}")
    if authority is not None and rec.header(b"host") != [authority]:
        problems.append(f"absolute-form {req.url!r} arrived with Host {rec.header(b'host')!r}")
    expected_host = authority if authority is not None else (req.header(b"host") or [b""])[0]
    if rec.header(b"x-forwarded-host") != [expected_host]:
        problems.append(f"X-Forwarded-Host {rec.header(b'x-forwarded-host')!r}, expected {expected_host!r}")
    return [f"request #{index}: {p}" for p in problems]


# -- the harness ---------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    requests: int = 0
    forwarded: int = 0
    refused: int = 0
    responses: int = 0
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    hits: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    closed: bool = False
    elapsed: float = 0.0


class Harness:
    """A uvloop loop in a thread running one router and two recording origins for a whole module."""

    def __init__(self, settings: RouterSettings | None = None) -> None:
        self.settings = settings or RouterSettings(timeouts=TIMEOUTS)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="fuzz-loop", daemon=True)
        self.counter = itertools.count()
        self.origins = {name: RecordingOrigin(name, self.counter) for name in ("baseline", "alice")}
        self.router: RouterServer | None = None
        self.examples = 0
        self._peers = itertools.count()
        self.peers: set[bytes] = set()
        """Every client address used so far (each example connects from its own 127.1.x.y)."""
        self._beat = 0.0
        self.worst_lag = 0.0
        self.totals = Outcome()
        self.started = time.monotonic()
        self.gc_max = 0.0
        self._gc_started = 0.0

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_started = now
        elif self._gc_started:
            self.gc_max = max(self.gc_max, now - self._gc_started)
            self._gc_started = 0.0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self._beat:
            self.worst_lag = max(self.worst_lag, now - self._beat - 0.05)
        self._beat = now
        self.loop.call_later(0.05, self._heartbeat)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"the exchange did not finish within {timeout:.1f} s (harness bound)") from None

    def start(self) -> None:
        gc.callbacks.append(self._gc)
        self.thread.start()
        self.run(self._start(), 10)

    async def _start(self) -> None:
        for origin in self.origins.values():
            await origin.start()
        table = make_table(
            {"a": {"baseline": self.origins["baseline"].url, "overrides": {"alice": self.origins["alice"].url}}}
        )
        self.router = RouterServer(self.settings, table)
        await self.router.start(("127.0.0.1", 0))
        self.loop.call_soon(self._heartbeat)

    def stop(self) -> None:
        gc.callbacks.remove(self._gc)
        gc.unfreeze()
        gc.collect()  # now, not in a later test's event loop
        try:
            self.run(self._stop(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _stop(self) -> None:
        if self.router is not None:
            await self.router.close(drain=0.5)
        for origin in self.origins.values():
            await origin.close()

    def _count_example(self) -> None:
        if self.examples % 100 == 0:
            # Between examples, with the loop idle: collect, then exempt everything alive from
            # future collections. Hypothesis' own bookkeeping grows with every example, and a full
            # collection over it, run by whichever thread allocates, would stall the router's loop
            # for a second after a few thousand examples.
            gc.collect()
            gc.freeze()
        self.examples += 1

    def _next_peer(self) -> str:
        """A client address of its own for each example (127.1.x.y): X-Forwarded-For tells the
        origins which example a request came from."""
        n = next(self._peers)
        peer = f"127.1.{(n // 254) % 250}.{n % 254 + 1}"
        self.peers.add(peer.encode())
        return peer

    def check(self, case: Case) -> Outcome:
        self._count_example()
        outcome = self.run(self._check(case), 30)
        totals = self.totals
        for field in ("requests", "forwarded", "refused", "responses"):
            setattr(totals, field, getattr(totals, field) + getattr(outcome, field))
        totals.statuses.update(outcome.statuses)
        totals.hits.update(outcome.hits)
        return outcome

    def summary(self, profile: str) -> str:
        t = self.totals
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(t.statuses.items()))
        hits = ", ".join(f"{k}: {n}" for k, n in sorted(t.hits.items())) or "none"
        return (
            f"fuzz[{profile}]: {self.examples} examples in {time.monotonic() - self.started:.1f} s; "
            f"{t.requests} requests parsed by the reference, {t.forwarded} forwarded to origins, "
            f"{t.refused} refused by the router; responses by status {{{statuses}}}; known-bug hits: {hits}; "
            f"longest GC pause {self.gc_max:.2f} s"
        )

    # -- one example -------------------------------------------------------------------------

    async def _check(self, case: Case) -> Outcome:
        assert self.router is not None
        ctx = self.router.ctx
        assert ctx is not None
        peer = self._next_peer()
        for origin in self.origins.values():
            origin.records.clear()
            origin.problems.clear()
            origin.hits.clear()
        self.worst_lag = 0.0
        ref = reference_parse(case.raw)
        outcome = Outcome(requests=len(ref.requests))
        hits = outcome.hits
        loop = asyncio.get_running_loop()
        started = loop.time()

        is_head = ref.is_head
        data, closed = await self._exchange(case, ref, peer, is_head)
        outcome.closed = closed
        outcome.elapsed = loop.time() - started
        await asyncio.sleep(0.01)  # let the origins finish anything the router flushed at close

        problems: list[str] = []
        responses, framing_problem = split_responses(data, is_head, hits)
        if framing_problem:
            problems.append(framing_problem)
        outcome.responses = len(responses)
        outcome.statuses.update(r.status for r in responses)
        outcome.refused = sum(1 for r in responses if r.origin is None)
        problems += self._check_responses(case, ref, responses, closed, outcome)
        problems += self._check_forwarded(case, ref, responses, peer.encode(), outcome)
        problems += await self._check_alive(ctx)
        if problems:
            raise AssertionError(
                f"{len(problems)} invariant(s) broken for {case!r}\n  reference: {len(ref.requests)} complete, "
                f"partial={ref.partial is not None}, error={ref.error!r}, upgraded={ref.upgraded}; "
                f"closed={closed} after {outcome.elapsed:.2f} s\n  client got: {data[:600]!r}\n  - "
                + "\n  - ".join(problems)
            )
        return outcome

    @staticmethod
    def _deadline(case: Case, ref: Reference) -> float:
        """When the exchange must be over by the router's own deadlines."""
        t = TIMEOUTS
        if ref.partial is not None and not case.half_close and ref.cut is None:
            # The router must end it with its header_read or body_idle timer (408, close), also
            # for a head pipelined behind another exchange (once given keepalive_idle instead).
            return max(t.header_read, t.body_idle) + TIMER_SLACK
        # Otherwise nothing waits on a timer: the origins answer at once.
        return t.upstream_response + SLACK

    async def _exchange(
        self, case: Case, ref: Reference, peer: str, is_head: Callable[[int, int | None], bool]
    ) -> tuple[bytes, bool]:
        """Send the case's segments and read until the router closes or nothing more is due."""
        assert self.router is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        transport, client = await loop.create_connection(_Client, *self.router.address, local_addr=(peer, 0))
        try:
            segments = case.segments()
            for i, segment in enumerate(segments):
                if client.closed:
                    break  # the router refused and closed early; what it said is in client.data
                transport.write(segment)
                if i + 1 < len(segments):
                    await asyncio.sleep(0.003)
            if case.half_close and not client.closed:
                try:
                    transport.write_eof()
                except OSError:
                    pass
            # Stop reading on our own only when nothing more is due: every complete request has
            # an answer, nothing was left half-sent, and no answer announced a close.
            quiet = not case.half_close and ref.partial is None and ref.error is None and ref.cut is None
            grace_until: float | None = loop.time() + 0.02 if quiet and not ref.requests else None
            seen = 0
            while not client.closed:
                if quiet and grace_until is None and len(client.data) > seen:
                    seen = len(client.data)
                    responses, problem = split_responses(bytes(client.data), is_head, collections.Counter())
                    if len(responses) >= len(ref.requests) and problem is None and not any(r.closes for r in responses):
                        grace_until = loop.time() + 0.02
                limit = deadline if grace_until is None else min(deadline, grace_until)
                if loop.time() >= limit:
                    break
                client.wake.clear()
                try:
                    await asyncio.wait_for(client.wake.wait(), limit - loop.time())
                except TimeoutError:
                    break
        finally:
            transport.abort()
        return bytes(client.data), client.closed

    def _check_responses(
        self, case: Case, ref: Reference, responses: list[Response], closed: bool, outcome: Outcome
    ) -> list[str]:
        problems = []
        strict_bound = self._deadline(case, ref)
        finished = closed or (not case.half_close and ref.partial is None and ref.error is None and ref.cut is None
                              and len(responses) >= len(ref.requests))  # fmt: skip
        if not finished:
            problems.append(f"hang: the router neither answered everything nor closed within {PATIENCE:.1f} s")
        elif outcome.elapsed > strict_bound:
            problems.append(f"the exchange took {outcome.elapsed:.2f} s, past its {strict_bound:.1f} s deadline")
        for i, r in enumerate(responses):
            if r.version != "1.1":
                problems.append(f"response #{i} has version {r.version!r}")
            if len(r.header(b"content-length")) > 1 or (r.header(b"content-length") and r.header(b"transfer-encoding")):
                problems.append(f"response #{i} has ambiguous framing: {r.headers!r}")
            if r.origin is not None and i >= len(ref.requests):
                problems.append(f"response #{i} came from origin {r.origin} but the reference has no such request")
            if r.origin is None and r.status in (400, 405, 408, 413, 414, 431, 501, 505) and not r.closes:
                problems.append(f"router refused request #{i} with {r.status} without Connection: close")
            if r.origin is None and r.status < 400:
                problems.append(f"router itself answered request #{i} with {r.status}")
        extra = len(responses) - len(ref.requests)
        if extra > 1:
            problems.append(f"{len(responses)} responses for {len(ref.requests)} requests")
        elif extra == 1 and (responses[-1].origin is not None or responses[-1].status < 400):
            problems.append(f"an extra response for a request the reference did not accept: {responses[-1].status}")
        if ref.error is not None and len(responses) > len(ref.requests):
            # The router has every byte of an unparseable request at once: it answers at once
            # (a timeout status means it waited, and so went on with a request it knew was bad).
            last = responses[-1]
            if not last.closes:
                problems.append("the answer to an unparseable request does not close")
            if last.status in (408, 504):
                if STRICT or not (last.status == 408 and ref.failed is not None and ref.failed.head_done):
                    problems.append(f"an unparseable request was answered {last.status}, after a timeout")
                else:
                    outcome.hits["queued-malformed-forwarded"] += 1
        if case.half_close and ref.partial is not None:
            return problems  # "a half-close mid-request ends the exchange" (and those before it)
        # Every request up to the first that ends the connection is answered, unless an earlier
        # answer announced the close; a half-close after whole requests still gets their answers.
        due = len(ref.requests) if ref.cut is None else ref.cut + 1
        announced = next((i for i, r in enumerate(responses) if r.closes), None)
        if announced is not None:
            due = min(due, announced + 1)
        if len(responses) < due:
            problems.append(f"only {len(responses)} of {due} due responses arrived")
        if ref.cut is not None and len(responses) > ref.cut and not responses[ref.cut].closes:
            problems.append(f"request #{ref.cut} ends the connection but its answer does not say close")
        if ref.cut is not None and len(responses) > ref.cut and not closed:
            problems.append(f"request #{ref.cut} ends the connection but the router kept it open")
        if (ref.error is not None and announced is None and ref.cut is None
                and len(responses) == len(ref.requests)):  # fmt: skip
            problems.append(f"the router did not answer an unparseable request ({ref.error}) before closing")
        return problems

    def _check_forwarded(
        self, case: Case, ref: Reference, responses: list[Response], peer: bytes, outcome: Outcome
    ) -> list[str]:
        problems = []
        for origin in self.origins.values():
            problems += origin.problems
            outcome.hits.update(origin.hits)
        all_records = [r for origin in self.origins.values() for r in origin.records]
        records = {(r.origin, r.seq): r for r in all_records if r.peer == peer}
        for r in all_records:
            # Late arrivals from an earlier example are someone else's business; a request no
            # client sent (no or unknown X-Forwarded-For) was smuggled through the router.
            if r.peer != peer and r.peer not in self.peers:
                problems.append(f"origin {r.origin} saw a request no client sent (X-Forwarded-For peer "
                                f"{r.peer!r}): {r.method!r} {r.url!r} {r.headers!r}")  # fmt: skip
        outcome.forwarded = len(records)
        if len(records) > len(ref.requests):
            problems.append(f"origins saw {len(records)} requests, the reference parser only {len(ref.requests)}")
        mapped: dict[tuple[str, int], int] = {}
        for i, response in enumerate(responses):
            if response.origin is None:
                continue
            seq = response.header(b"x-seq")
            key = (response.origin, int(seq[0]) if seq and seq[0].isdigit() else -1)
            rec = records.get(key)
            if rec is None:
                problems.append(f"response #{i} names origin request {key} that this client never sent")
                continue
            if key in mapped:
                problems.append(f"responses #{mapped[key]} and #{i} both answer origin request {key}")
            mapped[key] = i
            if i < len(ref.requests):
                req = ref.requests[i]
                problems += compare(req, rec, i)
                want = expected_origin(req)
                if want is not None and rec.origin != want:
                    problems.append(f"request #{i} with baggage {req.header(b'baggage')!r} went to {rec.origin}")
        # Requests an origin completed whose answer the client never saw: only legitimate when the
        # client half-closed mid-request (the router then drops the exchange). They must still be
        # requests the reference accepted, in order, and never ones the router answered itself.
        unmapped = sorted((r for k, r in records.items() if k not in mapped), key=lambda r: r.seq)
        if unmapped and not (case.half_close and ref.partial is not None):
            problems.append(f"origins completed {len(unmapped)} request(s) whose answers never reached the client")
        refused = {i for i, r in enumerate(responses) if r.origin is None}
        taken = set(mapped.values())
        j = 0
        for rec in unmapped:
            while j < len(ref.requests) and (j in taken or j in refused or compare(ref.requests[j], rec, j)):
                j += 1
            if j >= len(ref.requests):
                problems.append(f"origin {rec.origin} saw a request matching no unanswered reference request: "
                                f"{rec.method!r} {rec.url!r} {rec.headers!r} body={rec.body[:80]!r}")  # fmt: skip
                break
            j += 1
        return problems

    async def _check_alive(self, ctx: Any) -> list[str]:
        problems = []
        assert self.router is not None
        for name, baggage in (("alice", b"baggage: devstack=alice\r\n"), ("baseline", b"")):
            raw = b"GET /__control HTTP/1.1\r\nHost: a\r\n" + baggage + b"Connection: close\r\n\r\n"
            reader, writer = await asyncio.open_connection(*self.router.address)
            try:
                writer.write(raw)
                data = await asyncio.wait_for(reader.read(), TIMEOUTS.upstream_response + SLACK)
            except (TimeoutError, ConnectionError) as exc:
                problems.append(f"control request to {name} failed: {exc!r}")
                continue
            finally:
                writer.close()
            if not data.startswith(b"HTTP/1.1 200 ") or b"x-origin: " + name.encode() not in data:
                problems.append(f"control request to {name} got {data[:200]!r}")
            control = [r for r in self.origins[name].records if r.peer == b"127.0.0.1"]
            if [(r.method, r.url) for r in control] != [(b"GET", b"/__control")]:
                problems.append(f"origin {name} saw {len(control)} requests from the control client: {control!r}")
            self.origins[name].records[:] = [r for r in self.origins[name].records if r.peer != b"127.0.0.1"]
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while ctx.connections and loop.time() < end:
            await asyncio.sleep(0.005)
        stats = self.router.stats
        if ctx.connections or stats.open_connections != 0:
            problems.append(f"router still tracks {len(ctx.connections)} client connections "
                            f"(open_connections={stats.open_connections})")  # fmt: skip
        if not 0 <= stats.upstream_connections <= 32:
            problems.append(f"router counts {stats.upstream_connections} upstream connections")
        if self.worst_lag > 1.0:
            problems.append(f"the event loop was blocked for {self.worst_lag:.2f} s")
        return problems
