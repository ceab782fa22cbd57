"""The YAML route source: schema validation with file:line errors, reloads, last good table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.aggregator import Aggregator
from controller.build import BuildError
from controller.sources.file import FileSource, load_route_file, parse_route_yaml
from router.table import EMPTY_TABLE, Fallback, RouteTable

GOOD = """\
services:
  payments:
    hosts: [payments, payments.default.svc.cluster.local]
    baseline: http://127.0.0.1:9001
    overrides:
      alice: {url: http://127.0.0.1:9101}
      bob:   {url: http://127.0.0.1:9102, ready: false, fallback: baseline, expires: 2030-01-01T00:00:00Z}
"""


def test_design_example_parses() -> None:
    services = parse_route_yaml(GOOD)
    routes = services["payments"]
    assert routes.baseline.address == ("127.0.0.1", 9001)
    assert routes.overrides["alice"].target.port == 9101
    bob = routes.overrides["bob"]
    assert (bob.ready, bob.fallback, bob.expires_at) == (False, Fallback.BASELINE, 1893456000.0)


def test_a_service_speaks_http1_unless_the_file_says_h2c() -> None:
    assert parse_route_yaml(GOOD)["payments"].protocol == "http1"
    routes = parse_route_yaml(GOOD.replace("    baseline:", "    protocol: h2c\n    baseline:"))["payments"]
    targets = [routes.baseline, *(ov.target for ov in routes.overrides.values())]
    assert [t.protocol for t in targets] == ["h2c", "h2c", "h2c"], "the baseline and every override"
    assert routes.baseline.pool_key == ("127.0.0.1", 9001, "h2c")
    explicit = parse_route_yaml(GOOD.replace("    baseline:", "    protocol: http1\n    baseline:"))
    assert explicit == parse_route_yaml(GOOD)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (GOOD.replace("ready: false", "ready: maybe"), 7, "'ready' must be true or false"),
        (
            GOOD.replace("    baseline:", "    protocol: h2\n    baseline:"),
            4,
            "service 'payments': protocol 'h2' must be 'http1' or 'h2c'",
        ),
        (GOOD.replace("    baseline:", "    protocol: [h2c]\n    baseline:"), 4, "protocol ['h2c'] must be"),
        (GOOD.replace("alice: {url", "alice: {protocol: h2c, url"), 6, "unknown key 'protocol'"),
        (GOOD.replace("http://127.0.0.1:9001", "ftp://x"), 4, "only http://"),
        (GOOD.replace("fallback: baseline", "fallback: sometimes"), 7, "'fallback'"),
        (GOOD.replace("alice:", "Alice:"), 6, "DNS-1123"),
        (GOOD.replace("    hosts:", "    hostz:"), 3, "unknown key 'hostz'"),
        (GOOD + "  payments:\n    baseline: http://127.0.0.1:1\n", 8, "duplicate key 'payments'"),
        (GOOD.replace("overrides:", "overrides: [", 1), 7, "invalid YAML"),
        (GOOD.replace("expires: 2030-01-01T00:00:00Z", "expires: soon"), 7, "ISO 8601"),
        (
            "services:\n  a: {baseline: http://127.0.0.1:1}\n  b: {baseline: http://127.0.0.1:2, hosts: [a]}\n",
            None,
            "claimed",
        ),
    ],
)
def test_bad_route_files_name_the_line(text: str, line: int | None, fragment: str) -> None:
    with pytest.raises(BuildError) as info:
        table_from(parse_route_yaml(text, origin="routes.yaml"))
    message = str(info.value)
    assert fragment in message
    if line is not None:
        assert message.startswith(f"routes.yaml:{line}: "), message


def table_from(services: dict) -> RouteTable:  # type: ignore[type-arg]
    from controller.build import merge_snapshots

    return merge_snapshots({"file": services}, 1)


def test_unreadable_file_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="cannot read"):
        load_route_file(tmp_path / "missing.yaml")


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_reload_swaps_and_a_bad_edit_keeps_the_last_good_table(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(GOOD)
    published: list[RouteTable] = []
    aggregator = Aggregator(["file"], published.append)
    source = FileSource(path, aggregator.update, aggregator.report_error, interval=0.05)
    task = asyncio.create_task(source.run(), name="file-source-under-test")
    try:
        await wait_for(lambda: len(published) == 1)
        assert aggregator.ready and published[0].version == 1

        path.write_text(GOOD.replace("9101", "9201"))
        await wait_for(lambda: len(published) == 2)
        assert published[1].services["payments"].overrides["alice"].target.port == 9201

        path.write_text(GOOD.replace("ready: false", "ready: perhaps"))
        source.reload()
        await wait_for(lambda: "file" in aggregator.errors)
        assert aggregator.errors["file"].startswith(f"{path}:7: ")
        assert aggregator.table is published[-1] and len(published) == 2

        path.write_text(GOOD.replace("9101", "9301"))
        await wait_for(lambda: len(published) == 3)
        assert "file" not in aggregator.errors
        assert [t.version for t in published] == [1, 2, 3]
    finally:
        task.cancel()


def test_unchanged_snapshots_are_not_republished() -> None:
    published: list[RouteTable] = []
    aggregator = Aggregator(["file"], published.append)
    services = parse_route_yaml(GOOD)
    assert aggregator.update("file", services)
    assert not aggregator.update("file", parse_route_yaml(GOOD))
    assert len(published) == 1


def test_not_ready_until_every_source_delivered() -> None:
    published: list[RouteTable] = []
    aggregator = Aggregator(["file", "kubernetes"], published.append)
    aggregator.update("file", parse_route_yaml(GOOD))
    assert not aggregator.ready and not published and aggregator.table is EMPTY_TABLE
    aggregator.update("kubernetes", {})
    assert aggregator.ready and len(published) == 1


def test_a_service_defined_by_two_sources_is_reported_not_resolved() -> None:
    aggregator = Aggregator(["file", "kubernetes"], lambda table: None)
    aggregator.update("file", parse_route_yaml(GOOD))
    aggregator.update("kubernetes", parse_route_yaml(GOOD))
    assert "defined by both" in aggregator.errors["kubernetes"]


def test_the_cyclic_collector_is_paused_while_parsing_and_resumed_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from controller.sources import file as file_source

    seen: list[bool] = []
    real_parse = file_source.parse_route_yaml

    def recording_parse(text: str, origin: str = "<routes>") -> object:
        seen.append(gc.isenabled())
        return real_parse(text, origin)

    monkeypatch.setattr(file_source, "parse_route_yaml", recording_parse)
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text("services: [")
    assert gc.isenabled()
    assert "payments" in load_route_file(good)
    with pytest.raises(BuildError):
        load_route_file(bad)
    assert seen == [False, False], "paused during both parses"
    assert gc.isenabled(), "resumed after a good and after a bad file"
