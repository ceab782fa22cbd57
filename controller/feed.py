"""The versioned delta feed's content (``/v2/routes``): which lines a subscriber needs, encoded once.

This module owns what the controller remembers between table versions (the names each recent
version changed, a bounded history) and the bytes of every line the feed sends: a table's
snapshot, the delta from any remembered version to the current one, heartbeats, each encoded
once and shared by every subscriber, plain and as a gzip segment. It is sans-I/O: the HTTP
handler in ``controller.publish`` asks it for the line that brings a subscriber from the version
it holds to the current one, so a slow subscriber skips versions instead of queueing them. It
never builds or changes a table, and never holds an old table: a delta is always rendered from
the current table's services, so history costs names, not tables.

Wire format (one JSON object per line; an empty line is a heartbeat)::

    {"kind":"snapshot","version":V,"instance":I,"sources":[...],"groups":{...},"services":{...}}
    {"kind":"delta","from":V1,"version":V2,"instance":I,"sources":[...],"groups":{...},
     "set":{service: <its JSON as in RouteTable.to_json>},"removed":[service, ...]}

A delta carries the table-level fields (``sources``, ``groups``) whole: they are small, and a
subscriber can then rebuild exactly ``to_json`` of version V2 from V1 and the delta.

A subscriber may name a scope (``/v2/routes?services=a,b.shop.svc``: service names or authorities
it routes): its snapshot and deltas then carry only the services those names cover, so a sidecar's
table and traffic grow with what its app calls, not with the cluster. A scope is fixed for one
subscription; a subscriber that needs more asks again with the larger scope, for a snapshot.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import struct
import zlib
from collections.abc import Iterable
from typing import Final

from router.table import EMPTY_TABLE, Routes, RouteTable

__all__ = ["FeedSettings", "Frame", "GzipFraming", "HEARTBEAT", "RouteFeed"]


_DEFAULT_LEVEL: Final = 6


@dataclasses.dataclass(frozen=True, slots=True)
class FeedSettings:
    history: int = 64
    """Versions whose changes are remembered: a router that reconnects within a few dozen changes
    (a controller-side blip, a rolling restart of routers) gets a delta; one further behind gets a
    snapshot, which is what it would cost to replay that many deltas anyway on a busy cluster."""
    gzip_level: int = _DEFAULT_LEVEL
    """zlib's default: a 10,000-service snapshot compresses about 30x in under 0.1 s, once."""


_SEPARATORS: Final = (",", ":")


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=_SEPARATORS).encode()


# --- gzip as shared segments ------------------------------------------------------------------
# Each line is deflated once, on its own (a fresh compressor, so it never refers to an earlier
# line) and ended with a sync flush (byte-aligned, not final): such segments concatenate into one
# valid deflate stream in any order. A subscriber's gzip stream is a 10-byte header, the shared
# segments it is sent, and at the end a trailer whose CRC-32 is combined from the segments' own
# CRCs (zlib's crc32_combine, which Python's zlib does not expose): per subscriber and line, one
# 32-step multiplication, against tens of milliseconds to compress a large snapshot per subscriber.

_CRC_POLY: Final = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a·b modulo the CRC-32 polynomial (reflected bit order), as zlib's ``multmodp``; ``a`` non-zero."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _x2n_table() -> tuple[int, ...]:
    p = 1 << 30  # x^1
    table = [p]
    for _ in range(31):
        p = _multmodp(p, p)
        table.append(p)
    return tuple(table)


_X2N: Final = _x2n_table()


def _shift_for(length: int) -> int:
    """x^(8·length) modulo the polynomial: what a CRC is multiplied by when ``length`` bytes follow."""
    p = 1 << 31  # x^0
    k = 3
    while length:
        if length & 1:
            p = _multmodp(_X2N[k & 31], p)
        length >>= 1
        k += 1
    return p


@dataclasses.dataclass(frozen=True, slots=True)
class _Segment:
    deflated: bytes
    crc: int
    size: int
    shift: int


_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, OS unknown
_FINAL_BLOCK: Final = b"\x03\x00"  # an empty final fixed-Huffman block: ends the deflate stream


class Frame:
    """One line of the feed: its plain bytes, and (made on first demand, once) its gzip segment."""

    __slots__ = ("_segment", "_level", "line", "version")

    def __init__(self, line: bytes, version: int, level: int = _DEFAULT_LEVEL) -> None:
        self.line = line
        self.version = version
        """The table version a subscriber holds once it has applied this line."""
        self._level = level
        self._segment: _Segment | None = None

    @property
    def segment(self) -> _Segment:
        if self._segment is None:
            compressor = zlib.compressobj(self._level, zlib.DEFLATED, -zlib.MAX_WBITS)
            deflated = compressor.compress(self.line) + compressor.flush(zlib.Z_SYNC_FLUSH)
            self._segment = _Segment(deflated, zlib.crc32(self.line), len(self.line), _shift_for(len(self.line)))
        return self._segment


HEARTBEAT: Final = Frame(b"\n", 0)
"""An empty line: the stream is alive and nothing changed."""


class GzipFraming:
    """One subscriber's gzip stream over shared segments: the header first, then each frame's
    segment, then (when the stream ends normally) the trailer with the CRC of all it carried."""

    __slots__ = ("_crc", "_size", "_started")

    def __init__(self) -> None:
        self._crc = 0
        self._size = 0
        self._started = False

    def wrap(self, frame: Frame) -> bytes:
        segment = frame.segment
        self._crc = _multmodp(segment.shift, self._crc) ^ segment.crc
        self._size += segment.size
        if self._started:
            return segment.deflated
        self._started = True
        return _GZIP_HEADER + segment.deflated

    def trailer(self) -> bytes:
        head = b"" if self._started else _GZIP_HEADER
        self._started = True
        return head + _FINAL_BLOCK + struct.pack("<II", self._crc, self._size & 0xFFFFFFFF)


# --- history and lines ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Change:
    """What one publish changed: names only; the bytes are always rendered from the current table."""

    start: int
    version: int
    changed: frozenset[str]
    """Services added or replaced (present in ``version``)."""
    created: frozenset[str]
    """The subset of ``changed`` that ``start`` did not have."""
    removed: frozenset[str]
    rehosted: frozenset[str] = frozenset()
    """The subset of ``changed`` whose hosts changed: it may have left (or joined) a host scope."""


class RouteFeed:
    """The current table, the recent history of changes, and the encoded lines of the current version."""

    def __init__(self, instance: str, settings: FeedSettings | None = None) -> None:
        self.instance = instance
        self.settings = settings or FeedSettings()
        self.table: RouteTable = EMPTY_TABLE
        self._history: collections.deque[_Change] = collections.deque(maxlen=self.settings.history)
        self._fragments: dict[str, bytes] = {}
        """Service name → ``"name":{...}`` as the current table has it; dropped when it changes,
        encoded again on first demand, so an unchanged service is encoded once across versions."""
        self._frames: dict[tuple[int | None, frozenset[str] | None], Frame] = {}
        """Lines to the current version, by the version they start from (None: the snapshot) and
        the subscriber's scope (None: every service)."""
        self._table_fields = b""
        self.encodings = 0
        """Lines encoded so far (snapshots and deltas): one per (from, to) whatever the number of subscribers."""
        self.fragment_encodings = 0
        """Services encoded so far: each service once per change of it, not once per line."""

    @property
    def version(self) -> int:
        return self.table.version

    def publish(self, table: RouteTable) -> None:
        """Make ``table`` current, remembering which services it changed against the previous one."""
        previous = self.table
        if table is previous:
            return
        if table.version <= previous.version:
            # Versions come from the aggregator and only grow; if they ever did not, a remembered
            # version could name other content: forget them all, so everyone gets a snapshot.
            self._history.clear()
            self._fragments.clear()
        else:
            old = previous.services
            changed: set[str] = set()
            created: set[str] = set()
            rehosted: set[str] = set()
            for name, routes in table.services.items():
                before = old.get(name)
                if before is None:
                    created.add(name)
                    changed.add(name)
                elif before is not routes and before != routes:  # most services are shared or equal
                    changed.add(name)
                    if before.hosts != routes.hosts:
                        rehosted.add(name)
            removed = {name for name in old if name not in table.services}
            for name in changed | removed:
                self._fragments.pop(name, None)
            self._history.append(
                _Change(
                    previous.version,
                    table.version,
                    frozenset(changed),
                    frozenset(created),
                    frozenset(removed),
                    frozenset(rehosted),
                )
            )
        self.table = table
        self._frames = {}
        self._table_fields = b""

    def remembers(self, instance: str | None, since: int | None) -> bool:
        """True when the feed can bring a subscriber holding ``since`` of ``instance`` to the current
        version with a delta (or with nothing, if it is current)."""
        if instance != self.instance or since is None or since <= 0:
            return False
        if since == self.table.version:
            return True
        return any(change.start == since for change in self._history)

    def frame(self, held: int | None, scope: frozenset[str] | None = None) -> Frame:
        """The line that brings a subscriber holding ``held`` (None: nothing usable) to the current
        version: a delta when ``held`` is remembered, else the snapshot; encoded once per start
        (and scope: a scoped subscriber's lines carry only the services its scope names)."""
        remembered = held is not None and held != self.table.version and self._since_index(held) is not None
        start = held if remembered else None
        frame = self._frames.get((start, scope))
        if frame is None:
            covered = None if scope is None else self.covered(scope)
            line = self._snapshot_line(covered) if start is None else self._delta_line(start, covered)
            frame = Frame(line, self.table.version, self.settings.gzip_level)
            self._frames[(start, scope)] = frame
            self.encodings += 1
        return frame

    def covered(self, scope: frozenset[str]) -> frozenset[str]:
        """The services of the current table a scope names: each name is a service's name or an
        authority one of its hosts answers (``payments``, ``payments.shop.svc:8080``), as a router
        resolves the requests it has seen; names that match nothing are simply not covered (yet)."""
        table = self.table
        services = table.services
        covered = set()
        for name in scope:
            if name in services:
                covered.add(name)
            else:
                routes = table.routes_for_authority(name)
                if routes is not None:
                    covered.add(routes.service)
        return frozenset(covered)

    def _since_index(self, held: int) -> int | None:
        for index, change in enumerate(self._history):
            if change.start == held:
                return index
        return None

    def _fragment(self, name: str, routes: Routes) -> bytes:
        fragment = self._fragments.get(name)
        if fragment is None:
            fragment = _dumps(name) + b":" + _dumps(routes.to_json())
            self._fragments[name] = fragment
            self.fragment_encodings += 1
        return fragment

    def _fields(self) -> bytes:
        """``"version":…,"instance":…,"sources":…,"groups":…``: the table-level fields every line carries."""
        if not self._table_fields:
            table = self.table
            self._table_fields = (
                f'"version":{table.version},"instance":{json.dumps(self.instance)},'.encode()
                + b'"sources":'
                + _dumps(list(table.sources))
                + b',"groups":'
                + _dumps(table.groups_json())
            )
        return self._table_fields

    def _services(self, names: Iterable[str]) -> bytes:
        services = self.table.services
        return b",".join(self._fragment(name, services[name]) for name in names)

    def _snapshot_line(self, covered: frozenset[str] | None) -> bytes:
        names = self.table.services if covered is None else sorted(covered)
        return b'{"kind":"snapshot",' + self._fields() + b',"services":{' + self._services(names) + b"}}\n"

    def _delta_line(self, start: int, covered: frozenset[str] | None) -> bytes:
        """One delta from ``start`` to the current version, however many versions lie between: each
        touched service is either set to its current routes or removed, if ``start`` had it.

        For a scope (``covered``: the services it names now), only covered services are set. A
        service outside it is listed as removed if ``start`` had it and it is gone or its hosts
        changed since (it may have been in scope by a host it no longer has: the feed keeps names,
        not the old tables that would tell); a scoped subscriber drops removals of services it does
        not hold. Other changes outside the scope cost the subscriber nothing but the version.
        Nothing in scope changed: the line still comes, with nothing set, to move its version on."""
        index = self._since_index(start)
        assert index is not None, "frame() checks that the start is remembered"
        existed_at_start: dict[str, bool] = {}
        rehosted: set[str] = set()
        for change in list(self._history)[index:]:
            rehosted |= change.rehosted
            for name in change.changed:
                existed_at_start.setdefault(name, name not in change.created)
            for name in change.removed:
                existed_at_start.setdefault(name, True)
        current = self.table.services
        kept = {name for name in existed_at_start if name in current and (covered is None or name in covered)}
        changed = sorted(kept)
        removed = sorted(
            name
            for name, existed in existed_at_start.items()
            if existed and name not in kept and (covered is None or name not in current or name in rehosted)
        )
        return (
            b'{"kind":"delta","from":'
            + str(start).encode()
            + b","
            + self._fields()
            + b',"set":{'
            + self._services(changed)
            + b'},"removed":'
            + _dumps(removed)
            + b"}\n"
        )
