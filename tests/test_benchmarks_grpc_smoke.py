"""The benchmark's gRPC rows: h2load parsing, gRPC answers judged, generated h2c configurations.

Pure parts are tested directly; the generated nginx and haproxy configurations are checked by the
tools themselves when installed; one slow test runs the gRPC rows for nginx and haproxy end to
end in a subprocess (the harness pins its own process to a core, which must not happen to the
test runner).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import configs
from benchmarks.configs import Upstreams
from benchmarks.correctness import grpc_code, grpc_mismatch
from benchmarks.grpc_rows import TARGET, Untimed, target_line
from benchmarks.h2c import UnaryAnswer, http2_refusal
from benchmarks.h2load import H2loadError, latency_percentiles, parse_h2load
from benchmarks.report import REQS, STREAMS, Cell, markdown_table, summarize
from benchmarks.scenarios import GRPC, GRPC_ALICE, Scenario
from controller.sources.file import parse_route_yaml

ROOT = Path(__file__).resolve().parent.parent
UPSTREAMS = Upstreams(baseline=9001, alice=9101, bob=9102)
ECHO = Path(configs.ECHO_MODULE).exists()

H2LOAD_OUTPUT = """starting benchmark...
spawning thread #0: 50 total client(s). Timing-based test with 0s of warm-up time and 3s of main duration.
Application protocol: h2c

finished in 504.31ms, 29900.00 req/s, 4.82MB/s
requests: 14960 total, 15010 started, 14960 done, 14950 succeeded, 10 failed, 4 errored, 1 timeout
status codes: 14950 2xx, 0 3xx, 6 4xx, 0 5xx
traffic: 3.00MB (3142379) total, 1.69MB (1771242) headers (space savings 37.14%), 314.50KB (322044) data
                     min         max         mean         sd        +/- sd
time for request:      523us     43.61ms      5.07ms      5.07ms    92.01%
"""


def test_h2load_summary_counts_only_2xx_streams_and_its_errors() -> None:
    result = parse_h2load(H2LOAD_OUTPUT)
    assert (result.requests, result.seconds, result.done) == (14950, 0.50431, 14960)
    assert result.requests_per_second == pytest.approx(14950 / 0.50431)
    assert (result.failed, result.errored, result.timeouts, result.non_2xx) == (10, 4, 1, 6)
    assert result.errors == 10 + 1  # "failed" already includes the errored streams


def test_h2load_output_without_summary_is_an_error() -> None:
    with pytest.raises(H2loadError, match="no summary"):
        parse_h2load("invalid URI: nope\n")


def test_h2load_run_that_completed_nothing_is_an_error() -> None:
    # What h2load prints, exiting 0, when nothing listens on the port.
    text = H2LOAD_OUTPUT.replace(
        "requests: 14960 total, 15010 started, 14960 done, 14950 succeeded, 10 failed, 4 errored, 1 timeout",
        "requests: 0 total, 0 started, 0 done, 0 succeeded, 0 failed, 0 errored, 0 timeout",
    )
    with pytest.raises(H2loadError, match="completed no request"):
        parse_h2load(text)


def test_latency_percentiles_are_nearest_rank_over_the_logs_third_column() -> None:
    lines = [f"1795996776997245\t200\t{us}\n" for us in range(100, 0, -1)]  # 1..100 µs, shuffled order
    assert latency_percentiles(lines) == {"50": 50.0, "75": 75.0, "90": 90.0, "99": 99.0}
    assert latency_percentiles(["1\t200\t7\n"]) == {"50": 7.0, "75": 7.0, "90": 7.0, "99": 7.0}
    assert latency_percentiles([]) == {}


def test_grpc_request_and_replies_are_length_prefixed_messages() -> None:
    assert configs.GRPC_REQUEST == b"\x00\x00\x00\x00\x06\x0a\x04ping"
    reply = configs.grpc_reply("alice")
    assert reply[0] == 0 and int.from_bytes(reply[1:5], "big") == len(reply) - 5
    assert reply[5:] == b"\x0a\x05alice"


def _ok(target: str, **changes: Any) -> UnaryAnswer:
    answer = UnaryAnswer(
        200,
        {"content-type": "application/grpc", "x-served-by": target},
        configs.grpc_reply(target),
        {"grpc-status": "0"},
    )
    return dataclasses.replace(answer, **changes)


def test_a_complete_call_from_the_expected_upstream_passes() -> None:
    assert grpc_mismatch(_ok("alice"), "alice") is None


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (_ok("baseline"), "not answered by 'alice'"),
        (_ok("alice", trailers={}), "no trailer grpc-status: 0"),
        (_ok("alice", trailers={"grpc-status": "14"}), "no trailer grpc-status: 0"),
        (_ok("alice", headers={"x-served-by": "alice", "content-type": "text/plain"}), "content-type 'text/plain'"),
        (_ok("alice", reset=0), "not a complete 200"),
        (_ok("alice", status=502), "not a complete 200"),
    ],
    ids=["wrong upstream", "no trailers", "error status", "content-type", "reset", "http error"],
)
def test_a_call_answered_wrongly_is_described(answer: UnaryAnswer, problem: str) -> None:
    assert problem in (grpc_mismatch(answer, "alice") or "")


def test_a_refusal_may_be_an_http_404_or_a_trailers_only_unimplemented() -> None:
    trailers_only = UnaryAnswer(200, {"content-type": "application/grpc", "grpc-status": "12"}, b"", {})
    assert grpc_code(trailers_only) == 12
    assert grpc_mismatch(trailers_only, None, 404) is None
    assert grpc_mismatch(UnaryAnswer(404, {"content-type": "text/html"}, b"<html>", {}), None, 404) is None


def test_a_forwarded_call_is_no_refusal() -> None:
    assert "want a refusal" in (grpc_mismatch(_ok("baseline"), None, 404) or "")
    unavailable = UnaryAnswer(200, {"grpc-status": "14"}, b"", {})
    assert "want a refusal" in (grpc_mismatch(unavailable, None, 404) or "")


def test_grpc_scenario_sends_grpc_headers_with_its_baggage_to_the_authority() -> None:
    assert GRPC_ALICE.headers("bench") == [
        (":authority", "bench"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("baggage", "devstack=alice"),
    ]
    assert (GRPC_ALICE.connections, GRPC_ALICE.streams_per_connection, GRPC_ALICE.metric) == (50, 1, STREAMS)


def test_grpc_scenario_refuses_wrk_scripts() -> None:
    with pytest.raises(ValueError, match=r"HTTP/1\.1 only"):
        Scenario("bad", 1, STREAMS, script="upload", protocol=GRPC)


def test_nginx_string_refuses_bytes_it_would_read_differently() -> None:
    for bad in (b"it's", b"$x", b"a\\b", "é".encode()):
        with pytest.raises(ValueError):
            configs._nginx_quoted(bad)
    assert configs._nginx_quoted(configs.grpc_reply("bob")) == configs.grpc_reply("bob").decode("ascii")


def test_h2c_route_file_declares_the_protocol_for_every_target() -> None:
    services = parse_route_yaml(configs.route_yaml(UPSTREAMS, protocol="h2c"))
    bench = services["bench"]
    if not hasattr(bench.baseline, "protocol"):
        pytest.skip("this router's route file has no protocol field yet")
    assert {bench.baseline.protocol, *(o.target.protocol for o in bench.overrides.values())} == {"h2c"}


def _stream_cell(rep: int, candidate: str, value: float) -> Cell:
    detail = {"latency_us": {"50": value / 10}}
    return Cell(rep, GRPC_ALICE.name, candidate, value, 100, 1.0, value, 0, 40.0, 0.5, 1024, detail=detail)


def test_target_line_compares_the_router_with_the_better_peer() -> None:
    cells = [_stream_cell(0, "nginx", 10_000), _stream_cell(0, "haproxy", 20_000), _stream_cell(0, "router", 7_000)]
    line = target_line(summarize(cells, {GRPC_ALICE.name: STREAMS}), GRPC_ALICE, [])
    assert "0.35× haproxy" in line and f"target ≥ {TARGET}×: met" in line
    cells[-1] = _stream_cell(0, "router", 5_000)
    assert "NOT met" in target_line(summarize(cells, {GRPC_ALICE.name: STREAMS}), GRPC_ALICE, [])


def test_target_line_says_why_the_router_was_not_timed() -> None:
    untimed = [Untimed("router", "no HTTP/2 front end: its listener answered …\nmore", failure=False)]
    line = target_line([], GRPC_ALICE, untimed)
    assert line.endswith("router not timed (no HTTP/2 front end: its listener answered …)")


def test_markdown_table_with_latency_has_a_p50_column_per_stream() -> None:
    cells = [_stream_cell(0, "nginx", 10_000), _stream_cell(1, "nginx", 12_000)]
    table = markdown_table(summarize(cells, {GRPC_ALICE.name: STREAMS}), latency=True, per="stream")
    assert "| p50 µs | proxy CPU µs/stream |" in table
    assert "| 1,100 | 40.0 |" in table  # median of the runs' p50s
    plain = markdown_table(summarize([dataclasses.replace(cells[0], scenario="get")], {"get": REQS}))
    assert "p50" not in plain


@pytest.fixture
def http1_only_listener() -> Iterator[int]:
    """A listener that answers anything with an HTTP/1.1 400, as an HTTP/1.1-only server answers the preface."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=serve, name="http1-only-listener", daemon=True)
    thread.start()
    yield server.getsockname()[1]
    thread.join(5)
    server.close()


def test_a_listener_without_http2_is_told_apart(http1_only_listener: int) -> None:
    assert "HTTP/1.1 400" in (http2_refusal(http1_only_listener, timeout=5) or "")


@pytest.mark.skipif(shutil.which("nginx") is None or not ECHO, reason="nginx or its echo module not installed")
@pytest.mark.parametrize("which", ["upstream", "proxy"])
def test_nginx_accepts_generated_grpc_configuration(tmp_path: Path, which: str) -> None:
    if which == "upstream":
        text = configs.nginx_grpc_upstream_conf(str(tmp_path), UPSTREAMS, echo_module=configs.ECHO_MODULE)
    else:
        text = configs.nginx_grpc_proxy_conf(str(tmp_path), 8080, UPSTREAMS)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    done = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_generated_h2_configuration(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(configs.haproxy_proxy_cfg(8080, UPSTREAMS, h2=True))
    done = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("h2load", "nginx", "haproxy", "taskset")) or not ECHO,
    reason="h2load, nginx (with its echo module), haproxy or taskset missing",
)
def test_grpc_rows_run_end_to_end_for_nginx_and_haproxy(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--scenarios", "grpc-alice", "--candidates", "nginx,haproxy",
         "--reps", "1", "--duration", "1", "--warmup", "0", "--quiet-wait", "0", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nginx: 9 gRPC routing checks passed" in done.stdout
    assert "haproxy: 9 gRPC routing checks passed" in done.stdout
    (result,) = tmp_path.glob("*.json")
    document = json.loads(result.read_text())
    assert document["grpc"]["untimed"] == []
    cells = {c["candidate"]: c for c in document["cells"]}
    assert set(cells) == {"nginx", "haproxy"}
    for cell in cells.values():
        assert cell["scenario"] == GRPC_ALICE.name
        assert cell["value"] > 0 and cell["requests"] > 0 and cell["errors"] == 0
        assert cell["cpu_us_per_request"] > 0
        assert cell["detail"]["latency_us"]["50"] > 0
    assert "## gRPC over h2c" in (tmp_path / result.name.replace(".json", ".md")).read_text()
