"""The Grafana dashboard (manifests/dashboards/devstack-router.json) against what is really exported.

The dashboard is checked as a dashboard (ids, datasource variable, targets, filters), then every
metric its PromQL names is looked up in the real ``/metrics`` of a router started in-process (and
of a controller serving a route file, for the controller row): a renamed or removed metric fails
here instead of leaving an empty panel in someone's Grafana.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.cli import Controller
from router.settings import RouterSettings
from tests.support import Origin, make_table, running_router

DASHBOARD = Path(__file__).resolve().parents[1] / "manifests" / "dashboards" / "devstack-router.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# -- a small PromQL tokenizer ---------------------------------------------------------------------

# fmt: off
AGGREGATORS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
        "quantile", "limitk", "limit_ratio",
    }
)
FUNCTIONS = AGGREGATORS | frozenset(
    {
        "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
        "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
        "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_avg",
        "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
        "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace",
        "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute",
        "month", "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
        "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt",
        "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector",
        "year",
    }
)
# fmt: on
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = GROUPING | frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"})
RANGE_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets"})
"""Functions that only make sense over a counter (or a histogram's _bucket, _count, _sum)."""

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<variable>\$(?:\{[\w:.]+\}|\w+))
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@:])
    """,
    re.VERBOSE,
)


@dataclasses.dataclass(frozen=True)
class Selector:
    """A metric name as written in an expression, with its label matchers (label, op, value)."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()
    under: str | None = None
    """The function the selector is the direct argument of (``rate`` in ``rate(x[5m])``)."""


@dataclasses.dataclass
class Parsed:
    selectors: list[Selector] = dataclasses.field(default_factory=list)
    functions: set[str] = dataclasses.field(default_factory=set)
    grouping: set[str] = dataclasses.field(default_factory=set)
    """Labels named in by/without/on/ignoring/group_left/group_right clauses."""
    ranges: list[str] = dataclasses.field(default_factory=list)
    """What is inside each ``[...]``, as written."""

    @property
    def metrics(self) -> set[str]:
        return {s.name for s in self.selectors}

    @property
    def labels(self) -> set[str]:
        return self.grouping | {label for s in self.selectors for label, _, _ in s.matchers}


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot tokenize {expr[pos : pos + 20]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append((kind, match.group()))
        pos = match.end()
    return tokens


def _closing(tokens: list[tuple[str, str]], start: int, close: str, expr: str) -> int:
    """Index of the first ``close`` at or after ``start``."""
    for index in range(start, len(tokens)):
        if tokens[index] == ("op", close):
            return index
    raise ValueError(f"unclosed {close!r} in {expr!r}")


def _matchers(tokens: list[tuple[str, str]], start: int, expr: str) -> tuple[tuple[tuple[str, str, str], ...], int]:
    """The matchers of ``{...}`` opening at ``start``; and the index after its ``}``."""
    end = _closing(tokens, start, "}", expr)
    inner = [t for t in tokens[start + 1 : end] if t != ("op", ",")]
    if len(inner) % 3:
        raise ValueError(f"malformed label matchers in {expr!r}")
    matchers = []
    for label, op, value in zip(inner[::3], inner[1::3], inner[2::3], strict=True):
        if label[0] != "ident" or op[1] not in ("=", "!=", "=~", "!~") or value[0] != "string":
            raise ValueError(f"malformed label matcher {label[1]}{op[1]}{value[1]} in {expr!r}")
        matchers.append((label[1], op[1], value[1][1:-1]))
    return tuple(matchers), end + 1


def parse_promql(expr: str) -> Parsed:
    """Metric names (identifiers that are not functions, keywords or label names), labels, ranges."""
    tokens = tokenize(expr)
    parsed = Parsed()
    calls: list[str | None] = []  # the function (or None for a bare parenthesis) per open "("
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else ("", "")
        if (kind, text) == ("op", "["):
            end = _closing(tokens, index, "]", expr)
            parsed.ranges.append("".join(t for _, t in tokens[index + 1 : end]))
            index = end + 1
        elif (kind, text) == ("op", "{"):  # a selector by matchers alone: {__name__="x"}
            _, index = _matchers(tokens, index, expr)
        elif (kind, text) == ("op", "("):
            calls.append(None)
            index += 1
        elif (kind, text) == ("op", ")"):
            if not calls:
                raise ValueError(f"unbalanced ')' in {expr!r}")
            calls.pop()
            index += 1
        elif kind != "ident":
            index += 1
        elif text.lower() in GROUPING:
            if following == ("op", "("):
                end = _closing(tokens, index + 1, ")", expr)
                parsed.grouping |= {t for k, t in tokens[index + 2 : end] if k == "ident"}
                index = end + 1
            else:
                index += 1  # group_left / group_right without labels
        elif following == ("op", "("):
            parsed.functions.add(text)
            calls.append(text)
            index += 2
        elif text in AGGREGATORS and following[1].lower() in ("by", "without"):
            parsed.functions.add(text)
            index += 1
        elif text.lower() in KEYWORDS:
            index += 1
        else:
            matchers: tuple[tuple[str, str, str], ...] = ()
            index += 1
            if index < len(tokens) and tokens[index] == ("op", "{"):
                matchers, index = _matchers(tokens, index, expr)
            parsed.selectors.append(Selector(text, matchers, calls[-1] if calls else None))
    if calls:
        raise ValueError(f"unbalanced '(' in {expr!r}")
    return parsed


# -- the dashboard ------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every label_values() variable query."""
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} (id {panel['id']})", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*", query, re.DOTALL)
        assert match, f"variable ${variable['name']}: only label_values(<selector>, <label>) is checked: {query!r}"
        yield f"variable ${variable['name']}", match.group(1)


def metric_uses(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    """Metric name → where the dashboard uses it."""
    uses: dict[str, set[str]] = {}
    for where, expr in queries(dashboard):
        for name in parse_promql(expr).metrics:
            uses.setdefault(name, set()).add(where)
    return uses


# -- the exposition -----------------------------------------------------------------------------


@dataclasses.dataclass
class Exposition:
    types: dict[str, str]
    """``# TYPE`` name → type. In the classic text format a counter's TYPE name ends in _total."""
    samples: set[str]

    def resolve(self, name: str) -> str | None:
        """The family a name in PromQL reads, or None if nothing exported answers to it.

        A histogram is read through its _bucket, _count and _sum series, never by its bare name;
        those suffixes are stripped only where the base is a histogram (or, for _count and _sum,
        a summary): ``devstack_requests_total_count`` is no series.
        """
        for suffix in ("_bucket", "_count", "_sum"):
            base = name.removesuffix(suffix)
            if base != name and (
                self.types.get(base) == "histogram" or (self.types.get(base) == "summary" and suffix != "_bucket")
            ):
                return base
        if self.types.get(name) in ("counter", "gauge", "untyped"):
            return name
        return name if name in self.samples and name not in self.types else None

    def kind(self, name: str) -> str | None:
        """counter for a counter or a histogram's series (all only ever grow), gauge, or None."""
        family = self.resolve(name)
        if family is None:
            return None
        return "counter" if family != name or self.types.get(family) == "counter" else self.types.get(family, "untyped")

    def missing(self, names: set[str]) -> list[str]:
        return sorted(name for name in names if self.resolve(name) is None)


def parse_exposition(text: str) -> Exposition:
    types: dict[str, str] = {}
    samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            assert name not in types, f"# TYPE {name} twice"
            types[name] = kind
        elif line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
            assert match, f"not a sample line: {line!r}"
            samples.add(match.group())
    return Exposition(types, samples)


def merge(*expositions: Exposition) -> Exposition:
    merged = Exposition({}, set())
    for exposition in expositions:
        merged.types.update(exposition.types)
        merged.samples |= exposition.samples
    return merged


# -- tests --------------------------------------------------------------------------------------


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] == "devstack router"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"]), dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None, "an exported id would clash on import"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "service", "controller_job"):
        assert variables[name]["datasource"] == DATASOURCE, name
        assert variables[name]["multi"] and variables[name]["includeAll"], name
    service_query = variables["service"]["query"]
    assert re.fullmatch(r"label_values\(devstack_requests_total(\{.*\})?, service\)", service_query), service_query

    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        where = f"panel {panel['title']!r} (id {panel['id']})"
        assert panel["type"] in ("timeseries", "stat"), where
        assert panel["datasource"] == DATASOURCE, where
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, where
        assert panel["fieldConfig"]["defaults"]["unit"] in (
            "reqps", "s", "percentunit", "bytes", "short", "none", "cps", "ops",
        ), where  # fmt: skip
        targets = panel["targets"]
        assert targets, f"{where}: no targets"
        assert len({t["refId"] for t in targets}) == len(targets), f"{where}: duplicate refIds"
        for target in targets:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, where
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), f"{where}: a target without expr"
            assert "{{key}}" not in target.get("legendFormat", ""), where


def test_the_queries_are_well_formed() -> None:
    dashboard = load_dashboard()
    problems = []
    for where, expr in queries(dashboard):
        parsed = parse_promql(expr)
        if unknown := parsed.functions - FUNCTIONS:
            problems.append(f"{where}: unknown functions {sorted(unknown)}")
        if "key" in parsed.labels:
            problems.append(f"{where}: a key label (the router exports none): {expr}")
        if bad := [r for r in parsed.ranges if r not in ("$__rate_interval", "$__range")]:
            problems.append(f"{where}: ranges {bad} (use $__rate_interval, or $__range for a whole-range stat)")
        if "histogram_quantile" in parsed.functions and "le" not in parsed.grouping:
            problems.append(f"{where}: histogram_quantile without 'by (le, ...)'")
        for selector in parsed.selectors:
            matchers = {(label, op, value) for label, op, value in selector.matchers}
            if selector.name.startswith("devstack_controller_"):
                wanted = {("job", "=~", "$controller_job")}
            else:
                wanted = {("job", "=~", "$job"), ("instance", "=~", "$instance")}
            if where.startswith("panel") and not wanted <= matchers:
                problems.append(f"{where}: {selector.name} lacks {sorted(wanted - matchers)}")
    assert not problems, "\n".join(problems)


def test_latency_panels_are_per_service_quantiles_in_seconds() -> None:
    dashboard = load_dashboard()
    quantiles = set()
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            parsed = parse_promql(expr)
            if "histogram_quantile" in parsed.functions:
                assert panel["fieldConfig"]["defaults"]["unit"] == "s", panel["title"]
                assert all(s.name.endswith("_bucket") and s.under == "rate" for s in parsed.selectors), expr
                per_service = re.fullmatch(r"histogram_quantile\(([0-9.]+), sum by \(le, service\) .*", expr)
                if "devstack_request_duration_seconds_bucket" in parsed.metrics and per_service:
                    quantiles.add(per_service.group(1))
            if "process_resident_memory_bytes" in parsed.metrics:
                assert panel["fieldConfig"]["defaults"]["unit"] == "bytes", panel["title"]
            if "devstack_requests_total" in parsed.metrics:
                assert panel["fieldConfig"]["defaults"]["unit"] == "reqps", panel["title"]
    assert quantiles == {"0.5", "0.95", "0.99"}


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        ('sum by (le, svc) (rate(a_bucket{job=~"$job"}[$__rate_interval]))', {"a_bucket"}, {"le", "svc", "job"}),
        ("sum(rate(x_total[5m])) without (instance) / on() group_left() sum(y)", {"x_total", "y"}, {"instance"}),
        ("histogram_quantile(0.99, sum(rate(h_bucket[1m])) by (le)) > bool 1e-3", {"h_bucket"}, {"le"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)") and on(instance) z offset 5m', {"up", "z"}, {"instance"}),
        ("min(time() - process_start_time_seconds)", {"process_start_time_seconds"}, set()),
        ('count_values("v", build_info) unless ignoring(a, b) inf_metric', {"build_info", "inf_metric"}, {"a", "b"}),
        ('{__name__="x"} + sum without(le) (nan_total) or Inf', {"nan_total"}, {"le"}),
    ],
)
def test_the_tokenizer(expr: str, metrics: set[str], labels: set[str]) -> None:
    parsed = parse_promql(expr)
    assert parsed.metrics == metrics
    assert parsed.labels == labels


def test_the_tokenizer_refuses_what_it_cannot_read() -> None:
    for expr in ("sum(rate(x[5m])", "x{job=}", "x{job=~$job}", "rate(x[5m]))", "x # y"):
        with pytest.raises(ValueError):
            parse_promql(expr)


REQUIRED = {
    "devstack_requests_total",
    "devstack_request_duration_seconds_bucket",
    "devstack_upstream_errors_total",
    "devstack_rejected_requests_total",
    "devstack_route_source_staleness_seconds",
    "process_resident_memory_bytes",
}
"""What the dashboard must show at least."""


async def test_every_metric_the_dashboard_names_is_exported(tmp_path: Path, origins: dict[str, Origin]) -> None:
    settings = RouterSettings(access_log=str(tmp_path / "a.log"))  # the access-log metrics exist only then
    baseline, alice = origins["baseline"].url, origins["alice"].url
    table = make_table({"payments": {"baseline": baseline, "overrides": {"alice": alice}}})
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"services:\n  payments:\n    baseline: {baseline}\n")
    controller = Controller(routes=routes, listen="127.0.0.1:0")
    await controller.start()
    try:
        async with running_router(table, settings, admin=True) as server, aiohttp.ClientSession() as session:
            proxy = f"http://127.0.0.1:{server.address[1]}/"
            for host, baggage, status in (
                ("payments", "x=1", 200),
                ("payments", "devstack=alice", 200),
                ("nowhere", "x=1", 404),  # a rejected request, and a duration under service "-"
            ):
                async with session.get(proxy, headers={"Host": host, "baggage": baggage}) as resp:
                    assert resp.status == status
            async with session.get(f"http://127.0.0.1:{server.admin_address[1]}/metrics") as resp:
                assert resp.status == 200
                router_text = await resp.text()
            async with session.get("http://{}:{}/metrics".format(*controller.address)) as resp:
                assert resp.status == 200
                controller_text = await resp.text()
    finally:
        await controller.close()

    exported_by_router = parse_exposition(router_text)
    # The histograms have samples, so the scrape is the real thing and not just TYPE lines.
    for name in ("devstack_request_duration_seconds", "devstack_upstream_connect_seconds"):
        assert exported_by_router.types[name] == "histogram"
        assert f"{name}_bucket" in exported_by_router.samples, name
    exported = merge(exported_by_router, parse_exposition(controller_text))

    uses = metric_uses(load_dashboard())
    missing = exported.missing(set(uses))
    assert not missing, "the dashboard names metrics nothing exports:\n" + "\n".join(
        f"  {name} (in {', '.join(sorted(uses[name]))})" for name in missing
    )
    assert set(uses) >= REQUIRED, f"the dashboard does not show {sorted(REQUIRED - set(uses))}"
    router_names = {name for name in uses if not name.startswith("devstack_controller_")}
    assert not exported_by_router.missing(router_names), "router panels must read the router's own metrics"

    # rate()/increase() only over counters and histogram series; gauges are read as they are.
    misuse = []
    for where, expr in queries(load_dashboard()):
        if where.startswith("variable"):
            continue  # label_values() reads any series as it is
        for selector in parse_promql(expr).selectors:
            counter = exported.kind(selector.name) == "counter"
            if (selector.under in RANGE_FUNCTIONS) != counter:
                misuse.append(f"{where}: {selector.name} ({exported.kind(selector.name)}) under {selector.under}()")
    assert not misuse, "\n".join(misuse)

    # The negative check: a made-up name is found by the tokenizer and reported missing, and so
    # are a histogram read by its bare name and a suffix stripped where the base is no histogram.
    synthetic = (
        'sum(rate(devstack_nonexistent_total{job=~"$job"}[$__rate_interval]))'
        " / sum(rate(devstack_request_duration_seconds_count[$__rate_interval]))"
        " + devstack_request_duration_seconds + devstack_requests_total_count"
    )
    found = parse_promql(synthetic).metrics
    assert found == {
        "devstack_nonexistent_total",
        "devstack_request_duration_seconds_count",
        "devstack_request_duration_seconds",
        "devstack_requests_total_count",
    }
    assert exported.missing(found) == [
        "devstack_nonexistent_total",
        "devstack_request_duration_seconds",
        "devstack_requests_total_count",
    ]
