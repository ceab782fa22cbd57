"""The benchmark harness's own behaviour: wrk parsing, generated configurations, summaries.

Pure parts are tested directly; the generated nginx and haproxy configurations are checked by
the tools themselves when installed; one slow test runs ``--quick`` end to end in a subprocess
(the harness pins its own process to a core, which must not happen to the test runner).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import configs
from benchmarks.configs import Upstreams
from benchmarks.correctness import PROXY_CHECKS, Check
from benchmarks.profiling import fold
from benchmarks.report import MIBS, P50, REQS, Cell, markdown_table, summarize
from benchmarks.wrk import WrkError, parse_wrk
from controller.sources.file import parse_route_yaml

UPSTREAMS = Upstreams(baseline=9001, alice=9101, bob=9102)

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.01ms  512.00us  20.00ms   90.00%
    Req/Sec    16.70k   800.00    18.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    3.10ms
     90%    3.50ms
     99%    1.20s
  166123 requests in 10.00s, 20.12MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  16612.30
Transfer/sec:      2.01MB
BODY_MISMATCHES 7
"""


def test_wrk_summary_latency_units_and_errors_are_parsed() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.requests == 166123
    assert result.seconds == 10.0
    assert result.requests_per_second == 16612.30
    assert result.latency_us == {"50": 850.0, "75": 3100.0, "90": 3500.0, "99": 1_200_000.0}
    assert result.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 1}
    assert result.non_2xx == 5
    assert result.body_mismatches == 7
    assert result.errors == 5 + 3 + 7


def test_wrk_output_without_summary_is_an_error() -> None:
    with pytest.raises(WrkError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def _member_regex_matches(baggage: str, key: str) -> bool:
    return re.search(configs._member_regex(key), baggage) is not None


@pytest.mark.parametrize("check", [c for c in PROXY_CHECKS if c.host == configs.SERVICE], ids=lambda c: c.name)
def test_nginx_map_regex_picks_what_the_router_picks(check: Check) -> None:
    # The map regexes are PCRE; for these patterns Python's re has the same semantics.
    baggage = ",".join(check.baggage)
    matched = [key for key in configs.KEYS if _member_regex_matches(baggage, key)]
    assert matched == ([check.expect_body] if check.expect_body in configs.KEYS else [])


def test_route_files_load_with_the_project_parser() -> None:
    small = parse_route_yaml(configs.route_yaml(UPSTREAMS))
    assert set(small) == {"bench"}
    assert small["bench"].overrides["alice"].target.port == UPSTREAMS.alice


def test_large_route_file_has_the_requested_counts_and_routes_bench_alike() -> None:
    services = parse_route_yaml(configs.route_yaml_large(UPSTREAMS, services=20, overrides_per_service=10))
    assert len(services) == 20
    assert sum(len(r.overrides) for r in services.values()) == 200
    assert services["bench"].overrides["alice"].target.port == UPSTREAMS.alice
    assert services["bench"].overrides["bob"].target.port == UPSTREAMS.bob


def test_large_route_file_variants_differ_but_route_bench_alike() -> None:
    a = parse_route_yaml(configs.route_yaml_large(UPSTREAMS, services=5, overrides_per_service=3, variant=0))
    b = parse_route_yaml(configs.route_yaml_large(UPSTREAMS, services=5, overrides_per_service=3, variant=1))
    assert a != b
    assert a["bench"] == b["bench"]


def test_swap_route_files_alternate_and_route_bench_alike() -> None:
    even = parse_route_yaml(configs.route_yaml_swap(UPSTREAMS, 0))
    odd = parse_route_yaml(configs.route_yaml_swap(UPSTREAMS, 1))
    assert set(even) != set(odd)
    assert even["bench"] == odd["bench"]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
@pytest.mark.parametrize("which", ["upstream", "proxy"])
def test_nginx_accepts_generated_configuration(tmp_path: Path, which: str) -> None:
    echo = configs.ECHO_MODULE if Path(configs.ECHO_MODULE).exists() else None
    if which == "upstream":
        text = configs.nginx_upstream_conf(str(tmp_path), UPSTREAMS, str(tmp_path), echo_module=echo)
    else:
        text = configs.nginx_proxy_conf(str(tmp_path), 8080, UPSTREAMS)
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
def test_haproxy_accepts_generated_configuration(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(configs.haproxy_proxy_cfg(8080, UPSTREAMS))
    done = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _cell(rep: int, scenario: str, candidate: str, value: float) -> Cell:
    return Cell(rep, scenario, candidate, value, 100, 1.0, value, 0, None, None, None)


def test_summary_is_the_median_with_range_and_ratios_between_medians() -> None:
    cells = [
        *(_cell(r, "get", "nginx", v) for r, v in enumerate([100.0, 300.0, 200.0])),
        *(_cell(r, "get", "router", v) for r, v in enumerate([50.0, 150.0, 100.0])),
        *(_cell(r, "get", "direct", v) for r, v in enumerate([400.0, 400.0, 400.0])),
    ]
    by = {s.candidate: s for s in summarize(cells, {"get": REQS})}
    assert (by["router"].median, by["router"].low, by["router"].high) == (100.0, 50.0, 150.0)
    assert by["router"].vs == {"nginx": 0.5, "direct": 0.25}
    assert "nginx" not in by["nginx"].vs


def test_markdown_table_has_one_row_per_scenario_and_candidate() -> None:
    cells = [_cell(0, "lat", "nginx", 150.0), _cell(0, "lat", "router", 300.0), _cell(0, "mib", "router", 400.0)]
    table = markdown_table(summarize(cells, {"lat": P50, "mib": MIBS}))
    rows = [line for line in table.splitlines() if line.startswith("| lat") or line.startswith("| mib")]
    assert len(rows) == 3
    assert "| lat | router | 300 | 300–300 | µs | 2.00 |" in table


def test_profile_fold_counts_self_and_inclusive_and_skips_idle_workers() -> None:
    lines = [
        "<module> (devstack:1);main (/x/router/cli.py:181);f (/x/router/proxy.py:10);g (/x/router/keys.py:5) 3",
        "<module> (devstack:1);main (/x/router/cli.py:181);f (/x/router/proxy.py:10) 2",
        "Thread._bootstrap (threading.py:988);_worker (/usr/lib/python3.11/concurrent/futures/thread.py:69) 50",
    ]
    profile = fold(lines)
    assert profile.samples == 5
    costs = {f.function: (f.self_samples, f.total_samples) for f in profile.functions}
    assert costs["f (router/proxy.py:10)"] == (2, 5)
    assert costs["g (router/keys.py:5)"] == (3, 3)
    assert [f.function for f in profile.top(1, prefix="router/")] == ["g (router/keys.py:5)"]


@pytest.mark.slow
@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("wrk", "nginx", "taskset")), reason="wrk, nginx or taskset missing"
)
def test_quick_mode_runs_end_to_end_and_writes_results(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--duration", "1", "--warmup", "0", "--quiet-wait", "0",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode != 2, done.stdout + done.stderr
    (result,) = tmp_path.glob("*-quick.json")
    document = json.loads(result.read_text())
    assert {c["candidate"] for c in document["cells"]} == {"direct", "nginx", "router"}
    if done.returncode == 1:  # only a throughput floor may fail on a loaded host, never routing
        assert "x nginx" in (document["quick_failure"] or ""), done.stdout


def test_micro_benchmark_exchanges_route_to_alice_and_report_the_mode() -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.micro", "--exchanges", "300"],
        cwd=root, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert re.fullmatch(r"\d+\.\d\d us per exchange \(best of 5 x 300\), hot path \S.*\n", done.stdout), done.stdout


async def test_micro_benchmark_exchange_is_a_routed_keep_alive_exchange() -> None:
    import asyncio

    from benchmarks import micro

    client, upstream = micro._exchange_pair(asyncio.get_running_loop())
    for _ in range(3):
        client.data_received(micro.REQUEST)
        assert upstream.owner is client, "alice's pooled connection carries the request"
        upstream.data_received(micro.RESPONSE)
        assert upstream.owner is None and client.ctx.stats.upstream_connections == 0
    assert client.ctx.stats.requests[("bench", "override")] == 3
    assert client.transport is not None and client.transport.writes == 3  # type: ignore[attr-defined]
