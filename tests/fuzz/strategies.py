"""Hypothesis strategies for the request fuzz: HTTP/1.1 requests, valid or with one (sometimes
two) deliberate oddities in their syntax or framing (``requests``), byte-level mutations of them
(``mutations``, ``mutate``), and the ``Case`` an example sends: its bytes, where they are cut into
separately sent segments, and whether the client half-closes. Generation only: what the router
should make of a case is for ``reference`` and ``expectations`` to say.
"""

from __future__ import annotations

import dataclasses
import itertools

from hypothesis import strategies as st

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
