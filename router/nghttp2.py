"""The HTTP/2 engine over libnghttp2: ``NgEngine`` drives one nghttp2 session per connection in
memory, through ctypes, and turns its callbacks into the events ``H2Engine`` makes for the same
bytes. It loads the system's library (1.52 or later, soname 14; no headers, no compiler) and must
never raise at import (``AVAILABLE`` and ``MISSING`` say whether it loaded, and why not), let a
Python exception cross back into C, or touch a session that is deleted or broken.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import sys
import weakref
from typing import Any, Final

from router import COMPILED
from router.h2engine import (
    ConnectionTerminated,
    DataReceived,
    Engine,
    ErrorCode,
    Event,
    Headers,
    PingReceived,
    ProtocolError,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

__all__ = ["AVAILABLE", "MISSING", "NgEngine"]

# What libnghttp2 1.52 (Debian's 1.52.0-1+deb12u3) enforces itself, so this module does not:
# - RFC 9113 message rules (pseudo-fields, connection-specific fields, ``te``, characters in
#   names and values, content-length against the DATA received, trailers with END_STREAM), as
#   stream errors (RST_STREAM PROTOCOL_ERROR); the one rule it lacks, a ``host`` that differs
#   from ``:authority``, is checked here, as h2 checks it;
# - HPACK: the dynamic table at our SETTINGS_HEADER_TABLE_SIZE (4096), a name or value at 64 KiB
#   encoded (GOAWAY COMPRESSION_ERROR; only a ``max_header_list`` above that lets one through);
# - at most 8 CONTINUATION frames per header block (CVE-2024-28182, Debian's backport: fatal,
#   GOAWAY ENHANCE_YOUR_CALM from here);
# - at most 32 entries per SETTINGS frame (GOAWAY ENHANCE_YOUR_CALM);
# - at most 1000 SETTINGS and PING acknowledgements owed (NGHTTP2_ERR_FLOODED: ``receive`` writes
#   them out each time, so only a flood within one read);
# - a client's rapid resets (CVE-2023-44487, Debian's backport: 1000, then 33 a second; GOAWAY
#   INTERNAL_ERROR, which ``receive`` raises as a ProtocolError);
# - streams above our SETTINGS_MAX_CONCURRENT_STREAMS: RST_STREAM REFUSED_STREAM until the peer
#   acknowledges our SETTINGS, a connection error (PROTOCOL_ERROR) once it has, where RFC 9113
#   5.1.2 wants a stream error; so nghttp2 is given twice the limit the peer is shown
#   (``_advertise``), and the streams between are refused here.
# It does not bound a header list's total size: ``max_header_list`` is enforced here, per header
# block, as RFC 9113 counts it (name, value and 32 octets a field).

SONAME: Final = "libnghttp2.so.14"
"""The ABI declared below; found by soname first, then by ``ctypes.util.find_library``."""
MIN_VERSION: Final = 0x013400
"""1.52.0, Debian bookworm's: RFC 9113 field validation (whitespace around values included)."""
OVERSIZED_HEADERS_RESET: Final = ErrorCode.PROTOCOL_ERROR
"""RST_STREAM code for a header block above ``max_header_list``: not REFUSED_STREAM, which
invites the peer to retry the same head, and not nghttp2's INTERNAL_ERROR, which blames us."""

# -- nghttp2.h constants ---------------------------------------------------------------------------

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
_FLAG_END_STREAM, _FLAG_ACK = 0x1, 0x1
_SETTINGS_MAX_CONCURRENT_STREAMS, _SETTINGS_INITIAL_WINDOW_SIZE = 0x3, 0x4
_SETTINGS_ENABLE_PUSH, _SETTINGS_MAX_FRAME_SIZE, _SETTINGS_MAX_HEADER_LIST_SIZE = 0x2, 0x5, 0x6
_DATA_FLAG_EOF, _DATA_FLAG_NO_END_STREAM = 0x1, 0x2
_HCAT_REQUEST = 0
_ERR_DEFERRED = -508
_ERR_TEMPORAL_CALLBACK_FAILURE = -521
_ERR_CALLBACK_FAILURE, _ERR_BAD_CLIENT_MAGIC, _ERR_FLOODED = -902, -903, -904
_ERR_TOO_MANY_CONTINUATIONS = -905  # Debian's CVE-2024-28182 backport (upstream 1.61)

_FATAL_CODES: Final = {
    _ERR_BAD_CLIENT_MAGIC: ErrorCode.PROTOCOL_ERROR,
    _ERR_FLOODED: ErrorCode.ENHANCE_YOUR_CALM,
    _ERR_TOO_MANY_CONTINUATIONS: ErrorCode.ENHANCE_YOUR_CALM,
}
"""GOAWAY codes for what ``mem_recv`` returns fatally without queuing a GOAWAY itself; any other
fatal return (out of memory, a callback that failed) is INTERNAL_ERROR."""

# -- nghttp2.h structures and callback types ---------------------------------------------------------

_c_ssize_t = ctypes.c_ssize_t
_VOIDP = ctypes.c_void_p


class _Info(ctypes.Structure):
    _fields_ = [
        ("age", ctypes.c_int),
        ("version_num", ctypes.c_int),
        ("version_str", ctypes.c_char_p),
        ("proto_str", ctypes.c_char_p),
    ]


class _FrameHd(ctypes.Structure):
    """``nghttp2_frame_hd``, the head of every ``nghttp2_frame`` union member."""

    _fields_ = [
        ("length", ctypes.c_size_t),
        ("stream_id", ctypes.c_int32),
        ("type", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
    ]


class _RstStream(ctypes.Structure):
    _fields_ = [("hd", _FrameHd), ("error_code", ctypes.c_uint32)]


class _GoAway(ctypes.Structure):
    _fields_ = [("hd", _FrameHd), ("last_stream_id", ctypes.c_int32), ("error_code", ctypes.c_uint32)]


class _PrioritySpec(ctypes.Structure):
    _fields_ = [("stream_id", ctypes.c_int32), ("weight", ctypes.c_int32), ("exclusive", ctypes.c_uint8)]


class _HeadersFrame(ctypes.Structure):
    _fields_ = [
        ("hd", _FrameHd),
        ("padlen", ctypes.c_size_t),
        ("pri_spec", _PrioritySpec),
        ("nva", ctypes.c_void_p),
        ("nvlen", ctypes.c_size_t),
        ("cat", ctypes.c_int),
    ]


class _Nv(ctypes.Structure):
    """``nghttp2_nv``; filled by ``struct`` from the field addresses (``_NV_ROW``), not field by field."""

    _fields_ = [
        ("name", _VOIDP),
        ("value", _VOIDP),
        ("namelen", ctypes.c_size_t),
        ("valuelen", ctypes.c_size_t),
        ("flags", ctypes.c_uint8),
    ]


class _SettingsEntry(ctypes.Structure):
    _fields_ = [("settings_id", ctypes.c_int32), ("value", ctypes.c_uint32)]


_INT = ctypes.c_int
_ON_FRAME = ctypes.CFUNCTYPE(_INT, _VOIDP, _VOIDP, _VOIDP)  # on_frame_recv, on_begin_headers
# on_header's name and value as c_char_p: nghttp2 passes them NUL-terminated, and ctypes makes the
# bytes in C (a third of the cost of two string_at calls); a NUL inside is checked for.
_ON_HEADER = ctypes.CFUNCTYPE(_INT, _VOIDP, _VOIDP, *(ctypes.c_char_p, ctypes.c_size_t) * 2, ctypes.c_uint8, _VOIDP)
_ON_INVALID_HEADER = ctypes.CFUNCTYPE(
    _INT, _VOIDP, _VOIDP, _VOIDP, ctypes.c_size_t, _VOIDP, ctypes.c_size_t, ctypes.c_uint8, _VOIDP
)
_ON_DATA_CHUNK = ctypes.CFUNCTYPE(_INT, _VOIDP, ctypes.c_uint8, ctypes.c_int32, _VOIDP, ctypes.c_size_t, _VOIDP)
_ON_STREAM_CLOSE = ctypes.CFUNCTYPE(_INT, _VOIDP, ctypes.c_int32, ctypes.c_uint32, _VOIDP)
_ON_FRAME_NOT_SEND = ctypes.CFUNCTYPE(_INT, _VOIDP, _VOIDP, _INT, _VOIDP)
_READ = ctypes.CFUNCTYPE(_c_ssize_t, _VOIDP, ctypes.c_int32, _VOIDP, ctypes.c_size_t, _VOIDP, _VOIDP, _VOIDP)


class _DataProvider(ctypes.Structure):
    _fields_ = [("source", _VOIDP), ("read_callback", _READ)]


_SIGNATURES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "nghttp2_session_callbacks_new": (_INT, [ctypes.POINTER(_VOIDP)]),
    # (Setters given _VOIDP take a function's address too: router._ngrecord's callbacks are not ctypes objects.)
    "nghttp2_session_callbacks_set_on_begin_headers_callback": (None, [_VOIDP, _VOIDP]),
    "nghttp2_session_callbacks_set_on_header_callback": (None, [_VOIDP, _VOIDP]),
    "nghttp2_session_callbacks_set_on_invalid_header_callback": (None, [_VOIDP, _ON_INVALID_HEADER]),
    "nghttp2_session_callbacks_set_on_frame_recv_callback": (None, [_VOIDP, _VOIDP]),
    "nghttp2_session_callbacks_set_on_data_chunk_recv_callback": (None, [_VOIDP, _VOIDP]),
    "nghttp2_session_callbacks_set_on_stream_close_callback": (None, [_VOIDP, _VOIDP]),
    "nghttp2_session_callbacks_set_on_frame_not_send_callback": (None, [_VOIDP, _ON_FRAME_NOT_SEND]),
    "nghttp2_option_new": (_INT, [ctypes.POINTER(_VOIDP)]),
    "nghttp2_option_set_no_auto_window_update": (None, [_VOIDP, _INT]),
    "nghttp2_option_set_no_http_messaging": (None, [_VOIDP, _INT]),
    "nghttp2_option_set_no_closed_streams": (None, [_VOIDP, _INT]),
    "nghttp2_session_server_new2": (_INT, [ctypes.POINTER(_VOIDP), _VOIDP, _VOIDP, _VOIDP]),
    "nghttp2_session_client_new2": (_INT, [ctypes.POINTER(_VOIDP), _VOIDP, _VOIDP, _VOIDP]),
    "nghttp2_session_del": (None, [_VOIDP]),
    "nghttp2_session_mem_recv": (_c_ssize_t, [_VOIDP, ctypes.c_char_p, ctypes.c_size_t]),
    "nghttp2_session_mem_send": (_c_ssize_t, [_VOIDP, _VOIDP]),
    "nghttp2_session_get_outbound_queue_size": (ctypes.c_size_t, [_VOIDP]),
    "nghttp2_session_resume_data": (_INT, [_VOIDP, ctypes.c_int32]),
    "nghttp2_submit_settings": (_INT, [_VOIDP, ctypes.c_uint8, _VOIDP, ctypes.c_size_t]),
    "nghttp2_session_set_local_window_size": (_INT, [_VOIDP, ctypes.c_uint8, ctypes.c_int32, ctypes.c_int32]),
    "nghttp2_submit_request": (ctypes.c_int32, [_VOIDP, _VOIDP, _VOIDP, ctypes.c_size_t, _VOIDP, _VOIDP]),
    "nghttp2_submit_response": (_INT, [_VOIDP, ctypes.c_int32, _VOIDP, ctypes.c_size_t, _VOIDP]),
    "nghttp2_submit_headers": (
        ctypes.c_int32,
        [_VOIDP, ctypes.c_uint8, ctypes.c_int32, _VOIDP, _VOIDP, ctypes.c_size_t, _VOIDP],
    ),
    "nghttp2_submit_trailer": (_INT, [_VOIDP, ctypes.c_int32, _VOIDP, ctypes.c_size_t]),
    "nghttp2_submit_rst_stream": (_INT, [_VOIDP, ctypes.c_uint8, ctypes.c_int32, ctypes.c_uint32]),
    "nghttp2_submit_goaway": (
        _INT,
        [_VOIDP, ctypes.c_uint8, ctypes.c_int32, ctypes.c_uint32, _VOIDP, ctypes.c_size_t],
    ),
    "nghttp2_session_get_last_proc_stream_id": (ctypes.c_int32, [_VOIDP]),
    "nghttp2_session_consume": (_INT, [_VOIDP, ctypes.c_int32, ctypes.c_size_t]),
    "nghttp2_session_consume_connection": (_INT, [_VOIDP, ctypes.c_size_t]),
    "nghttp2_session_get_stream_remote_window_size": (ctypes.c_int32, [_VOIDP, ctypes.c_int32]),
    "nghttp2_session_get_remote_window_size": (ctypes.c_int32, [_VOIDP]),
    "nghttp2_session_get_remote_settings": (ctypes.c_uint32, [_VOIDP, _INT]),
    "nghttp2_strerror": (ctypes.c_char_p, [_INT]),
}

_BYTES_DATA: Final = sys.getsizeof(b"") - 1
"""Offset of a ``bytes`` object's buffer from its ``id()`` (CPython's ``ob_sval``): header fields
and body chunks are handed to C by address, checked at load, never for anything but ``bytes``."""
_NV_ROW: Final = "PPNNN"
"""One ``nghttp2_nv``: name and value addresses, their lengths, and flags (0) with the padding."""


def _load() -> ctypes.CDLL:
    if sys.implementation.name != "cpython":
        raise OSError(f"{sys.implementation.name}: ctypes access to bytes buffers needs CPython")
    probe = b"nghttp2-probe"
    if ctypes.string_at(id(probe) + _BYTES_DATA, len(probe)) != probe:
        raise OSError("bytes objects are not laid out as this module expects")
    if struct.calcsize(_NV_ROW) != ctypes.sizeof(_Nv):
        raise OSError("nghttp2_nv does not pack as this module expects")
    try:
        # PyDLL: calls keep the GIL, which every callback needs (no release and take back per call).
        lib = ctypes.PyDLL(SONAME)
    except OSError:
        found = ctypes.util.find_library("nghttp2")
        if found is None:
            raise OSError(f"{SONAME} not found") from None
        lib = ctypes.PyDLL(found)
    version = lib.nghttp2_version
    version.restype = ctypes.POINTER(_Info)
    version.argtypes = [_INT]
    info = version(0).contents
    if info.version_num < MIN_VERSION:
        raise OSError(f"libnghttp2 {info.version_str.decode()} is older than 1.52")
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_lib: ctypes.CDLL
"""Bound only when the library loaded (AVAILABLE): nothing below runs otherwise."""


# -- per-stream state ---------------------------------------------------------------------------------


class _Stream:
    """One stream the caller knows of (a request reported, or one it opened): what it has queued
    for the peer, read by ``_read_data`` (the data provider) as the windows allow."""

    __slots__ = ("chunks", "offset", "queued", "head", "ended", "trailers", "deferred")

    def __init__(self, head: bool, ended: bool) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0
        """Bytes of ``chunks[0]`` already sent."""
        self.queued = 0
        """Bytes in ``chunks`` not yet sent."""
        self.head = head
        """Our head (request or final response) is submitted."""
        self.ended = ended
        """Nothing more will be queued: end_stream, send_trailers, or a head with end_stream."""
        self.trailers: Headers | None = None
        self.deferred = False
        """The data provider found nothing to send: nghttp2 waits for ``resume_data``."""


# -- callbacks: module-level, one set for every session; ``user_data`` names the engine -----------

_ENGINES: dict[int, weakref.ref[NgEngine]] = {}
"""Live engines by the ``user_data`` their session was created with, their recorder's address
(weak: a dropped engine's ``__del__`` deletes its session)."""


class _PyRecorder:
    """What the per-field and per-chunk callbacks collect for one session: the header block being
    received (one at a time on a connection) and the DATA frame being received, when it spans
    several ``receive`` calls. The Python definition of ``router._ngrecord.Recorder``, whose C
    callbacks do what ``_on_begin_headers``, ``_on_header`` and ``_on_data_chunk`` do here."""

    __slots__ = (
        "block", "cookies", "host", "chunks", "out", "error", "block_size", "max_header_list", "session", "block_sid",
        "chunks_sid", "client", "oversized_code",
    )  # fmt: skip

    def __init__(self) -> None:
        self.block: Headers = []
        self.cookies: list[bytes] | None = None
        self.host: bytes | None = None
        self.chunks: list[bytes] = []
        self.out: list[bytes] = []
        self.error: BaseException | None = None
        self.block_size = 0
        self.max_header_list = 0
        self.session = 0
        self.block_sid = 0
        self.chunks_sid = 0
        self.client = 0
        self.oversized_code = int(ErrorCode.PROTOCOL_ERROR)


def _callback_failed(user_data: int | None, exc: Exception) -> int:
    """A callback raised: remember why (``receive`` reports it) and fail the call into nghttp2."""
    ref = _ENGINES.get(user_data or 0)
    engine = ref() if ref is not None else None
    if engine is not None and engine._callback_error is None:
        engine._callback_error = exc
    return _ERR_CALLBACK_FAILURE


def _on_begin_headers(session: int | None, frame: int, user_data: int) -> int:
    try:
        engine = _ENGINES[user_data]()
        assert engine is not None
        rec = engine._rec
        rec.block = []
        rec.block_sid = _FrameHd.from_address(frame).stream_id
        rec.block_size = 0
        rec.cookies = None
        rec.host = None
        return 0
    except Exception as exc:  # noqa: BLE001 - nothing may cross back into C
        return _callback_failed(user_data, exc)


def _on_header(
    session: int | None,
    frame: int | None,
    name: bytes,
    namelen: int,
    value: bytes,
    valuelen: int,
    flags: int,
    user_data: int,
) -> int:
    try:
        engine = _ENGINES[user_data]()
        assert engine is not None
        rec = engine._rec
        if len(name) != namelen or len(value) != valuelen:  # a NUL inside (nghttp2 rejects them)
            engine._reset_block(ErrorCode.PROTOCOL_ERROR)
            return _ERR_TEMPORAL_CALLBACK_FAILURE
        size = rec.block_size + namelen + valuelen + 32
        if size > rec.max_header_list:
            engine._reset_block(rec.oversized_code)
            return _ERR_TEMPORAL_CALLBACK_FAILURE
        rec.block_size = size
        if name == b"cookie" and not rec.client:
            # As H2Engine (h2's inbound normalisation): crumbs joined, after the other fields.
            if rec.cookies is None:
                rec.cookies = [value]
            else:
                rec.cookies.append(value)
        else:
            if name == b"host":
                rec.host = value  # (nghttp2 refuses a second one)
            rec.block.append((name, value))
        return 0
    except Exception as exc:  # noqa: BLE001 - nothing may cross back into C
        return _callback_failed(user_data, exc)


def _on_invalid_header(
    session: int | None,
    frame: int | None,
    name: int | None,
    namelen: int,
    value: int | None,
    valuelen: int,
    flags: int,
    user_data: int,
) -> int:
    """A regular field nghttp2 would drop (a bad character in its name or value). From a client
    it makes the request malformed (RFC 9113 8.2.1): a stream error, as h2 refuses it too; from an
    upstream it is dropped, nghttp2's default (H2Engine passes it on)."""
    try:
        engine = _ENGINES[user_data]()
        assert engine is not None
        return _ERR_TEMPORAL_CALLBACK_FAILURE if not engine.client else 0
    except Exception as exc:  # noqa: BLE001 - nothing may cross back into C
        return _callback_failed(user_data, exc)


def _on_data_chunk(session: int | None, flags: int, stream_id: int, data: int, length: int, user_data: int) -> int:
    try:
        engine = _ENGINES[user_data]()
        assert engine is not None
        rec = engine._rec
        if rec.chunks_sid != stream_id:
            engine._drop_chunks()
            rec.chunks_sid = stream_id
        rec.chunks.append(ctypes.string_at(data, length))
        return 0
    except Exception as exc:  # noqa: BLE001 - nothing may cross back into C
        return _callback_failed(user_data, exc)


def _on_frame_recv(session: int | None, frame: int, user_data: int) -> int:
    hd = _FrameHd.from_address(frame)
    return _frame_received(user_data, hd.type, hd.stream_id, hd.flags, hd.length, frame)


def _frame_received(user_data: int, kind: int, sid: int, flags: int, length: int, frame: int) -> int:
    """A whole frame was received: what ``_on_frame_recv`` reports, from the frame's head (C's
    ``on_frame_recv`` in router._ngrecord calls this with the head read in C)."""
    try:
        engine = _ENGINES[user_data]()
        assert engine is not None
        if kind == _DATA:
            chunks = engine._rec.chunks
            if chunks and engine._rec.chunks_sid == sid:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
            else:
                engine._drop_chunks()
                data = b""
            if length != len(data):
                # nghttp2 has given the padding back to both windows already (it consumes the Pad
                # Length octet and the padding itself); ``consume`` subtracts it.
                prepaid = engine._prepaid
                prepaid[sid] = prepaid.get(sid, 0) + length - len(data)
            if not length and flags & _FLAG_END_STREAM:
                engine._events.append(StreamEnded(sid))
            else:
                engine._events.append(DataReceived(sid, data, length, bool(flags & _FLAG_END_STREAM)))
        elif kind == _HEADERS:
            engine._on_headers(sid, bool(flags & _FLAG_END_STREAM))
        elif kind == _RST_STREAM:
            engine._peer_reset = sid  # (nghttp2 closes the stream next)
            stream = engine._streams.pop(sid, None)
            if stream is not None:
                engine._queued -= stream.queued
                engine._events.append(StreamReset(sid, _RstStream.from_address(frame).error_code))
        elif kind == _WINDOW_UPDATE:
            engine._events.append(WindowUpdated(sid))
        elif kind == _SETTINGS:
            if not flags & _FLAG_ACK:
                engine._max_frame = _lib.nghttp2_session_get_remote_settings(engine._session, _SETTINGS_MAX_FRAME_SIZE)
                engine._events.append(RemoteSettingsChanged())
        elif kind == _PING:
            if not flags & _FLAG_ACK:
                engine._events.append(PingReceived())
        elif kind == _GOAWAY:
            goaway = _GoAway.from_address(frame)
            engine._peer_last_stream = goaway.last_stream_id
            engine._events.append(ConnectionTerminated(goaway.error_code, goaway.last_stream_id))
        return 0
    except Exception as exc:  # noqa: BLE001 - nothing may cross back into C
        return _callback_failed(user_data, exc)


def _on_stream_close(session: int | None, stream_id: int, error_code: int, user_data: int) -> int:
    return _stream_closed(user_data, stream_id, error_code)


def _stream_closed(user_data: int, stream_id: int, error_code: int) -> int:
    """What ``_on_stream_close`` does (C's ``on_stream_close`` calls this directly)."""
    try:
        engine = _ENGINES[user_data]()
        assert engine is not None
        if engine._rec.chunks_sid == stream_id:
            engine._drop_chunks()
        engine._forget(stream_id, error_code)
        return 0
    except Exception as exc:  # noqa: BLE001 - nothing may cross back into C
        return _callback_failed(user_data, exc)


def _on_frame_not_send(session: int | None, frame: int, lib_error_code: int, user_data: int) -> int:
    """A request HEADERS nghttp2 gave up on (a GOAWAY came first, or stream ids ran out): the
    stream never opened, so no stream-close callback will say so."""
    try:
        engine = _ENGINES[user_data]()
        assert engine is not None
        headers = _HeadersFrame.from_address(frame)
        if headers.hd.type == _HEADERS and headers.cat == _HCAT_REQUEST:
            engine._forget(headers.hd.stream_id, ErrorCode.REFUSED_STREAM)
        return 0
    except Exception as exc:  # noqa: BLE001 - nothing may cross back into C
        return _callback_failed(user_data, exc)


def _read_data(
    session: int | None,
    stream_id: int,
    buf: int,
    length: int,
    data_flags: int,
    source: int | None,
    user_data: int,
) -> int:
    """The data provider of every stream with a body: what its queue holds, up to ``length``."""
    try:
        engine = _ENGINES[user_data]()
        assert engine is not None
        stream = engine._streams.get(stream_id)
        if stream is None:
            return _ERR_DEFERRED
        chunks = stream.chunks
        written = 0
        while chunks:
            chunk = chunks[0]
            start = stream.offset
            size = len(chunk) - start
            room = length - written
            if size > room:
                ctypes.memmove(buf + written, id(chunk) + _BYTES_DATA + start, room)
                stream.offset = start + room
                written = length
                break
            ctypes.memmove(buf + written, id(chunk) + _BYTES_DATA + start if start else chunk, size)
            written += size
            stream.offset = 0
            del chunks[0]
        stream.queued -= written
        engine._queued -= written
        if not chunks and stream.ended:
            if stream.trailers is not None:
                ctypes.c_uint32.from_address(data_flags).value = _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
                count = engine._pack(stream.trailers)
                _lib.nghttp2_submit_trailer(session, stream_id, engine._nv_address, count)
            else:
                ctypes.c_uint32.from_address(data_flags).value = _DATA_FLAG_EOF
            return written
        if not written:
            stream.deferred = True
            return _ERR_DEFERRED
        return written
    except Exception as exc:  # noqa: BLE001 - nothing may cross back into C
        return _callback_failed(user_data, exc)


def _make_callbacks(lib: ctypes.CDLL, native: dict[str, int] | None) -> tuple[int, int, int, list[object]]:
    """The callbacks object, the session options, the data provider's address, and everything
    C holds a pointer into (kept for the life of the process). ``native``: router._ngrecord's
    callbacks by name, in place of their Python originals."""
    thunks: dict[str, object] = {
        "on_begin_headers": _ON_FRAME(_on_begin_headers),
        "on_header": _ON_HEADER(_on_header),
        "on_invalid_header": _ON_INVALID_HEADER(_on_invalid_header),
        "on_frame_recv": _ON_FRAME(_on_frame_recv),
        "on_data_chunk_recv": _ON_DATA_CHUNK(_on_data_chunk),
        "on_stream_close": _ON_STREAM_CLOSE(_on_stream_close),
        "on_frame_not_send": _ON_FRAME_NOT_SEND(_on_frame_not_send),
    }
    callbacks = _VOIDP()
    if lib.nghttp2_session_callbacks_new(ctypes.byref(callbacks)):
        raise MemoryError("nghttp2_session_callbacks_new")
    for name, thunk in thunks.items():
        chosen = native.get(name, thunk) if native is not None else thunk
        getattr(lib, f"nghttp2_session_callbacks_set_{name}_callback")(callbacks, chosen)
    option = _VOIDP()
    if lib.nghttp2_option_new(ctypes.byref(option)):
        raise MemoryError("nghttp2_option_new")
    lib.nghttp2_option_set_no_auto_window_update(option, 1)  # the caller gives bytes back: consume()
    lib.nghttp2_option_set_no_http_messaging(option, 0)  # keep RFC 9113 message validation
    lib.nghttp2_option_set_no_closed_streams(option, 1)  # no RFC 7540 priority tree to keep them for
    read = native.get("read") if native is not None else None
    provider = _DataProvider(None, _READ(read) if read is not None else _READ(_read_data))
    keep: list[object] = [*thunks.values(), provider]
    assert callbacks.value is not None and option.value is not None
    return callbacks.value, option.value, ctypes.addressof(provider), keep


if COMPILED:
    try:
        from router import _ngrecord
    except ImportError:  # an install without the C helpers
        _ngrecord = None  # type: ignore[assignment]
else:
    _ngrecord = None  # type: ignore[assignment]


def _native_callbacks(lib: ctypes.CDLL) -> dict[str, int] | None:
    """router._ngrecord's callbacks, bound to this library, when the hot path runs compiled (as
    every C helper of the router's: the interpreted router is pure Python)."""
    if _ngrecord is None:
        return None

    def address(function: str) -> int:
        value = ctypes.cast(getattr(lib, function), _VOIDP).value
        assert value is not None
        return value

    called = (
        "nghttp2_submit_rst_stream", "nghttp2_session_consume_connection", "nghttp2_session_mem_send",
        "nghttp2_session_mem_recv", "nghttp2_session_get_outbound_queue_size", "nghttp2_session_consume",
        "nghttp2_session_get_stream_remote_window_size", "nghttp2_session_get_remote_window_size",
        "nghttp2_session_get_remote_settings",
    )  # fmt: skip
    _ngrecord.bind({name: address(name) for name in called}, _frame_received, _stream_closed, _read_data)
    return _ngrecord.callbacks()


try:
    _lib = _load()
    _CALLBACKS, _OPTION, _PROVIDER, _KEEP = _make_callbacks(_lib, None)
    _NATIVE = _native_callbacks(_lib)
    if _NATIVE is not None:
        _NATIVE_CALLBACKS, _, _NATIVE_PROVIDER, _NATIVE_KEEP = _make_callbacks(_lib, _NATIVE)
    else:
        _NATIVE_CALLBACKS = _NATIVE_PROVIDER = 0
except (OSError, AttributeError, ValueError, MemoryError) as exc:
    AVAILABLE = False
    MISSING = str(exc) or type(exc).__name__
    _CALLBACKS = _OPTION = _PROVIDER = _NATIVE_CALLBACKS = _NATIVE_PROVIDER = 0
    _NATIVE = None
else:
    AVAILABLE = True
    MISSING = ""
NATIVE: Final = _NATIVE is not None
"""The per-field callbacks run in C (router._ngrecord): the default where it is built."""

_NV_PACKERS: dict[int, struct.Struct] = {}


def _authority(headers: Headers) -> bytes | None:
    """The request's ``:authority`` (None: it has none), among the pseudo-fields at its start."""
    for name, value in headers:
        if name == b":authority":
            return value
        if name[:1] != b":":
            break
    return None


def _advertise(frame: bytes, setting: int, value: int) -> bytes:
    """Our first SETTINGS frame, serialized, with ``setting`` shown to the peer as ``value``."""
    assert frame[3] == _SETTINGS and not frame[4], "the session's first frame is its SETTINGS"
    size = int.from_bytes(frame[:3], "big")
    patched = bytearray(frame)
    for at in range(9, 9 + size, 6):
        if int.from_bytes(frame[at : at + 2], "big") == setting:
            patched[at + 2 : at + 6] = value.to_bytes(4, "big")
            return bytes(patched)
    raise AssertionError(f"setting {setting} is not in {frame[: 9 + size]!r}")


def _goaway_frame(last_stream_id: int, code: int) -> bytes:
    """A GOAWAY frame built here, for a session nghttp2 can no longer be asked to serialize."""
    return struct.pack(">HBBBIII", 0, 8, _GOAWAY, 0, 0, last_stream_id & 0x7FFFFFFF, code)


def _library_goaway(output: bytes) -> int:
    """The error code of the first GOAWAY frame in ``output`` (serialized frames), or 0."""
    position = 0
    end = len(output) - 17
    while position <= end:
        length = int.from_bytes(output[position : position + 3], "big")
        if output[position + 3] == _GOAWAY:
            code = int.from_bytes(output[position + 13 : position + 17], "big")
            if code:
                return code
        position += 9 + length
    return 0


class NgEngine(Engine):
    """A libnghttp2 session behind the engine interface; ``close`` (or dropping the engine) frees it.

    Beyond H2Engine: a stream nghttp2 resets after the caller has heard of it (a message rule
    broken later, a stream window overrun) is reported as StreamReset with nghttp2's code (and
    so not counted in ``stream_errors``, which the caller charges once like a StreamReset).
    """

    def __init__(
        self,
        client: bool,
        *,
        max_streams: int,
        max_header_list: int,
        stream_window: int,
        connection_window: int,
        native: bool = NATIVE,
    ) -> None:
        self._session = 0
        """The ``nghttp2_session *``; 0 once deleted (closed, or broken by a fatal error)."""
        if not AVAILABLE:
            raise RuntimeError(f"libnghttp2 is not available: {MISSING}")
        self.client = client
        # Per connection.
        if native and not NATIVE:
            raise RuntimeError("router._ngrecord is not in use (the hot path is not compiled)")
        rec = self._rec = _ngrecord.Recorder() if native else _PyRecorder()
        rec.max_header_list = max_header_list
        rec.client = int(client)
        rec.oversized_code = OVERSIZED_HEADERS_RESET
        self._user_data = id(rec)
        """The session's user_data: the recorder's address, which the C callbacks use as is."""
        self._max_streams = max_streams
        self._events: list[Event] = []
        """What callbacks reported since ``receive`` last returned (a stream nghttp2 resets while
        ``output`` runs is reported by the next ``receive``)."""
        self._out = rec.out
        """Frames serialized and not yet taken by ``output`` (the recorder's: C's drain fills it)."""
        self._out_pointer = ctypes.c_size_t()
        """Where ``mem_send`` stores the address of what it serialized (an integer, never None)."""
        self._out_reference = ctypes.byref(self._out_pointer)
        self._nv = (_Nv * 32)()
        self._nv_address = ctypes.addressof(self._nv)
        self._error: ProtocolError | None = None
        """Set once the connection is broken: what ``receive`` raises from then on."""
        self._callback_error: Exception | None = None
        self._max_frame = 16384
        """The peer's SETTINGS_MAX_FRAME_SIZE (updated when its SETTINGS arrive)."""
        self._peer_last_stream = 0x7FFFFFFF
        """The last stream id of the peer's GOAWAY (nghttp2 closes ours above it)."""
        self._our_last_stream = 0x7FFFFFFF
        """The last stream id of our GOAWAY (nghttp2 closes the peer's above it)."""
        self._peer_reset = 0
        """The stream of the RST_STREAM being received."""
        self._resetting: set[int] = set()
        """Streams the caller reset, until nghttp2 closes them."""
        self.stream_errors = 0
        """Streams reset here or by nghttp2 for what the peer sent before the caller heard of
        them (a malformed head, one above our limit, an oversized header list)."""
        self._prepaid: dict[int, int] = {}
        """Padding nghttp2 gave back already, by stream: subtracted from what ``consume`` gives."""
        # Per stream.
        self._streams: dict[int, _Stream] = {}
        self._queued = 0
        """Bytes queued on all streams, not yet serialized (they count against the windows)."""

        self._session_del = _lib.nghttp2_session_del
        self._registry = _ENGINES
        """(Both held here: ``__del__`` may run after the module's globals are gone.)"""
        _ENGINES[self._user_data] = weakref.ref(self)
        session = _VOIDP()
        new = _lib.nghttp2_session_client_new2 if client else _lib.nghttp2_session_server_new2
        callbacks = _NATIVE_CALLBACKS if native else _CALLBACKS
        self._provider = _NATIVE_PROVIDER if native else _PROVIDER
        """The data provider every stream with a body is submitted with (its read callback)."""
        if new(ctypes.byref(session), callbacks, self._user_data, _OPTION) or not session.value:
            _ENGINES.pop(self._user_data, None)
            raise MemoryError("nghttp2_session_new")
        self._session = rec.session = session.value
        entries = [
            (_SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list),
            (_SETTINGS_INITIAL_WINDOW_SIZE, stream_window),
            (_SETTINGS_ENABLE_PUSH, 0),
        ]
        if not client:
            entries.insert(0, (_SETTINGS_MAX_CONCURRENT_STREAMS, min(2 * max_streams, 0xFFFFFFFF)))
        settings = (_SettingsEntry * len(entries))(*(_SettingsEntry(*entry) for entry in entries))
        if _lib.nghttp2_submit_settings(self._session, 0, settings, len(entries)):
            self.close()
            raise ValueError(f"nghttp2 refused the settings {entries!r}")
        if connection_window > 65535:
            _lib.nghttp2_session_set_local_window_size(self._session, 0, 0, connection_window)
        if not client:
            self._drain()
            self._out[0] = _advertise(self._out[0], _SETTINGS_MAX_CONCURRENT_STREAMS, max_streams)

    def close(self) -> None:
        """Delete the nghttp2 session (safe to call again; the engine does nothing afterwards)."""
        session = self._session
        if session:
            self._session = self._rec.session = 0
            self._out.clear()
            self._registry.pop(self._user_data, None)
            self._session_del(session)

    def __del__(self) -> None:
        self.close()

    # -- Engine --------------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        if self._error is not None:
            raise ProtocolError(self._error.code, str(self._error))
        session = self._session
        if not session:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        rec = self._rec
        if isinstance(rec, _PyRecorder):
            result = _lib.nghttp2_session_mem_recv(session, data, len(data))
            queued = result >= 0 and bool(_lib.nghttp2_session_get_outbound_queue_size(session))
        else:
            result, queued = _ngrecord.receive(rec, data)  # the same two calls in C
        if result < 0:
            self._break(result)
        if queued:
            # Acknowledgements, resets, or a GOAWAY nghttp2 queued for what it read: written out
            # now, so that resets are reported below and a GOAWAY is seen. Our own GOAWAY never is
            # here (goaway() serializes it at once).
            start = len(self._out)
            self._drain()
            if self._error is None and len(self._out) > start:
                code = _library_goaway(b"".join(self._out[start:]))
                if code:
                    self._error = ProtocolError(code)
            if self._error is not None:
                self._events = []
                raise ProtocolError(self._error.code, str(self._error))
        events = self._events
        self._events = []
        return events

    def output(self) -> bytes:
        if self._session:
            self._drain()
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def request(self, headers: Headers, end_stream: bool) -> int:
        if not self._session:
            raise RuntimeError("the connection is closed")
        count = self._pack(headers)
        stream_id = int(
            _lib.nghttp2_submit_request(
                self._session, None, self._nv_address, count, None if end_stream else self._provider, None
            )
        )
        if stream_id < 0:
            raise RuntimeError(f"nghttp2_submit_request: {_lib.nghttp2_strerror(stream_id).decode()}")
        self._streams[stream_id] = _Stream(True, end_stream)
        return stream_id

    def respond(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.head or not self._session:
            return
        count = self._pack(headers)
        if not end_stream and headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
            # An informational head: HEADERS without a body; the final head follows.
            _lib.nghttp2_submit_headers(self._session, 0, stream_id, None, self._nv_address, count, None)
            return
        provider = None if end_stream else self._provider
        if _lib.nghttp2_submit_response(self._session, stream_id, self._nv_address, count, provider) == 0:
            stream.head = True
            stream.ended = end_stream

    def send_data(self, stream_id: int, data: bytes) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # _read_data hands C the buffer of a bytes object
        stream.chunks.append(data)
        stream.queued += len(data)
        self._queued += len(data)
        if stream.deferred:
            stream.deferred = False
            _lib.nghttp2_session_resume_data(self._session, stream_id)

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            return
        for name, value in headers:  # checked here: the data provider packs them, called from C
            if type(name) is not bytes or type(value) is not bytes:
                raise TypeError(f"header fields must be bytes: {(name, value)!r}")
        stream.trailers = headers
        self._end(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            return
        self._end(stream_id, stream)

    def reset(self, stream_id: int, code: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None or not self._session:
            return
        self._queued -= stream.queued
        self._resetting.add(stream_id)
        _lib.nghttp2_submit_rst_stream(self._session, 0, stream_id, code)

    def consume(self, stream_id: int, length: int) -> None:
        if length <= 0 or not self._session:
            return
        prepaid = self._prepaid
        if prepaid:
            paid = prepaid.pop(stream_id, 0)
            if paid > length:
                prepaid[stream_id] = paid - length
                return
            length -= paid
            if not length:
                return
        # Both windows, or only the connection's when nghttp2 no longer has the stream.
        rec = self._rec
        if isinstance(rec, _PyRecorder):
            _lib.nghttp2_session_consume(self._session, stream_id, length)
        else:
            _ngrecord.consume(rec, stream_id, length)

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None or not self._session:
            return 0
        rec = self._rec
        if not isinstance(rec, _PyRecorder):
            return _ngrecord.send_window(rec, stream_id, stream.queued, self._queued, self._max_frame)
        session = self._session
        window = int(_lib.nghttp2_session_get_stream_remote_window_size(session, stream_id))
        if window < 0:
            # Our request is submitted but not yet serialized (nghttp2 opens the stream then):
            # it will start with the peer's initial window.
            window = int(_lib.nghttp2_session_get_remote_settings(session, _SETTINGS_INITIAL_WINDOW_SIZE))
        window = min(
            window - stream.queued,
            int(_lib.nghttp2_session_get_remote_window_size(session)) - self._queued,
            self._max_frame,
        )
        return window if window > 0 else 0

    def goaway(self, code: int, last_stream_id: int | None = None) -> None:
        session = self._session
        if not session or self._error is not None:
            return
        if last_stream_id is None:
            last_stream_id = int(_lib.nghttp2_session_get_last_proc_stream_id(session))
        self._our_last_stream = min(self._our_last_stream, last_stream_id)
        _lib.nghttp2_submit_goaway(session, 0, last_stream_id, code, None, 0)
        self._drain()

    @property
    def peer_max_streams(self) -> int:
        if not self._session:
            return 0
        return int(_lib.nghttp2_session_get_remote_settings(self._session, _SETTINGS_MAX_CONCURRENT_STREAMS))

    # -- inside ------------------------------------------------------------------------------------------

    def _pack(self, headers: Headers) -> int:
        """Fill ``self._nv`` with ``headers`` (nghttp2 copies them during the submit call)."""
        count = len(headers)
        if count > len(self._nv):
            self._nv = (_Nv * max(count, 2 * len(self._nv)))()
            self._nv_address = ctypes.addressof(self._nv)
        if not isinstance(self._rec, _PyRecorder):
            return _ngrecord.pack(self._nv_address, len(self._nv), headers)  # this loop in C
        packer = _NV_PACKERS.get(count)
        if packer is None:
            packer = _NV_PACKERS[count] = struct.Struct("@" + _NV_ROW * count)
        fields: list[int] = []
        extend = fields.extend
        for name, value in headers:
            if type(name) is not bytes or type(value) is not bytes:
                raise TypeError(f"header fields must be bytes: {(name, value)!r}")
            extend((id(name) + _BYTES_DATA, id(value) + _BYTES_DATA, len(name), len(value), 0))
        packer.pack_into(self._nv, 0, *fields)
        return count

    def _end(self, stream_id: int, stream: _Stream) -> None:
        stream.ended = True
        if stream.deferred:
            stream.deferred = False
            _lib.nghttp2_session_resume_data(self._session, stream_id)

    def _on_headers(self, stream_id: int, ended: bool) -> None:
        """A whole header block (``_on_frame_recv``): a request, a final response, or trailers."""
        rec = self._rec
        headers = rec.block if rec.block_sid == stream_id else []
        rec.block = []
        if rec.cookies is not None:
            headers.append((b"cookie", b"; ".join(rec.cookies)))
            rec.cookies = None
        # nghttp2 has checked the block (no_http_messaging off): a request or response starts
        # with its pseudo-fields, trailers have none.
        pseudo = bool(headers) and headers[0][0][:1] == b":"
        if not self.client:
            if pseudo:
                if rec.host is not None and _authority(headers) not in (None, rec.host):
                    # RFC 9113 8.3.1 (nghttp2 1.52 does not check it; h2 does): malformed.
                    _lib.nghttp2_submit_rst_stream(self._session, 0, stream_id, ErrorCode.PROTOCOL_ERROR)
                    return
                if len(self._streams) >= self._max_streams:
                    # Above the limit the peer was shown, below nghttp2's (see ``_advertise``).
                    _lib.nghttp2_submit_rst_stream(self._session, 0, stream_id, ErrorCode.REFUSED_STREAM)
                    return
                self._streams[stream_id] = _Stream(False, False)
                self._events.append(RequestReceived(stream_id, headers, ended))
            else:
                self._events.append(TrailersReceived(stream_id, headers))
        elif pseudo:
            if headers[0][1][:1] != b"1":  # 1xx heads are not reported
                self._events.append(ResponseReceived(stream_id, headers, ended))
        else:
            self._events.append(TrailersReceived(stream_id, headers))

    def _reset_block(self, code: int) -> None:
        """Refuse the header block being received (``_on_header``): nghttp2 decodes the rest for
        HPACK's sake, reports none of it, and, seeing our RST_STREAM queued, adds none of its own."""
        rec = self._rec
        _lib.nghttp2_submit_rst_stream(self._session, 0, rec.block_sid, code)
        rec.block = []
        rec.cookies = None

    def _forget(self, stream_id: int, code: int) -> None:
        """The stream is closed (or, a request of ours, never opened). Closed with an error code
        by nghttp2 for what the peer sent, or refused here (not by the caller's reset, the peer's
        RST_STREAM, or a GOAWAY either way): a stream the caller knows is reported StreamReset,
        any other is counted in ``stream_errors``."""
        if stream_id in self._resetting:
            self._resetting.discard(stream_id)
            return
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._queued -= stream.queued
        if not code or stream_id == self._peer_reset:
            return
        mine = (stream_id & 1) == self.client
        if stream_id > (self._peer_last_stream if mine else self._our_last_stream):
            return
        if stream is None:
            self.stream_errors += 1
            return
        # nghttp2 closes it when its RST_STREAM is written, at the end of ``receive``: the event
        # goes right after the stream's last one, where the frame that broke it was read, so that
        # a caller acting on events in order (a reset budget) sees it in time.
        events = self._events
        position = len(events)
        while position and events[position - 1].stream_id != stream_id:
            position -= 1
        events.insert(position or len(events), StreamReset(stream_id, code))

    def _drop_chunks(self) -> None:
        """DATA bytes of a frame nghttp2 abandoned (the stream reset in mid-frame): never reported,
        so never consumed by the caller; the connection's window gets them back here."""
        chunks = self._rec.chunks
        if chunks:
            _lib.nghttp2_session_consume_connection(self._session, sum(map(len, chunks)))
            chunks.clear()

    def _drain(self) -> None:
        """Serialize everything nghttp2 has queued into ``self._out`` (``_ngrecord.drain`` is this
        loop in C)."""
        rec = self._rec
        if isinstance(rec, _PyRecorder):
            send = _lib.nghttp2_session_mem_send
            session = self._session
            reference = self._out_reference
            pointer = self._out_pointer
            append = self._out.append
            while True:
                size = send(session, reference)
                if size <= 0:
                    break
                append(ctypes.string_at(pointer.value, size))
        else:
            size = _ngrecord.drain(rec)
        if size < 0:
            self._break(size, raise_=False)

    def _break(self, result: int, *, raise_: bool = True) -> None:
        """A fatal nghttp2 error: the session is deleted, a GOAWAY built here is queued, and
        ``receive`` raises from now on."""
        session = self._session
        code = _FATAL_CODES.get(result, ErrorCode.INTERNAL_ERROR)
        last_stream_id = int(_lib.nghttp2_session_get_last_proc_stream_id(session)) if session else 0
        message = f"nghttp2: {_lib.nghttp2_strerror(result).decode()}"
        cause = self._callback_error or self._rec.error
        if cause is not None:
            message = f"{message} ({cause!r})"
        self.close()
        self._out.append(_goaway_frame(last_stream_id, code))
        self._error = ProtocolError(code, message)
        if raise_:
            raise ProtocolError(code, message) from cause
