# nghttp2's per-field and per-chunk callbacks in C (router/_ngrecord.c); the Python originals are
# router.nghttp2._PyRecorder and the callbacks that fill it.

from collections.abc import Callable

class Recorder:
    block: list[tuple[bytes, bytes]]
    cookies: list[bytes] | None
    host: bytes | None
    chunks: list[bytes]
    out: list[bytes]
    error: BaseException | None
    block_size: int
    max_header_list: int
    session: int
    block_sid: int
    chunks_sid: int
    client: int
    oversized_code: int

def bind(
    functions: dict[str, int],
    frame_received: Callable[[int, int, int, int, int, int], int],
    stream_closed: Callable[[int, int, int], int],
    read_data: Callable[[int, int, int, int, int, int, int], int],
    /,
) -> None: ...
def receive(recorder: Recorder, data: bytes, /) -> tuple[int, bool]: ...
def consume(recorder: Recorder, stream_id: int, length: int, /) -> None: ...
def send_window(
    recorder: Recorder, stream_id: int, stream_queued: int, connection_queued: int, max_frame: int, /
) -> int: ...
def drain(recorder: Recorder, /) -> int: ...
def callbacks() -> dict[str, int]: ...
def pack(nv_address: int, capacity: int, headers: list[tuple[bytes, bytes]], /) -> int: ...
