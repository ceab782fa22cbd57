"""The dashboard page served at ``/`` by the router's admin listener and by the controller.

One self-contained HTML page (inline CSS and script, no external asset: clusters are often
offline): services, baselines, every override with its state and time left, preview and "use this
key" links, request counts, the table version and the sources' freshness. The whole table is
rendered here, on the server, so the page reads the same with JavaScript off (``?q=`` and
``?status=`` filter it); the inline script only follows ``dashboard/events`` (server-sent events
whose payloads are fragments rendered by the same functions, so there is one renderer) and
filters as you type.

This module is pure: it renders a ``Snapshot`` to text and imports only the standard library and
``router.table``, so the admin listener and the controller (which may import only the router's
pure modules) both serve it. It performs no I/O; its callers own the HTTP side.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Final
from urllib.parse import urlencode

from router.table import HTTP1, Fallback, Override, Routes, RouteTable

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "EXPIRING_SOON",
    "STATUS_FILTERS",
    "Fragments",
    "Links",
    "Snapshot",
    "SourceState",
    "event",
    "fragments",
    "override_status",
    "render_page",
]

EXPIRING_SOON: Final = 3600.0
"""Seconds: an override expiring within this is flagged "expiring soon"."""

STATUS_FILTERS: Final = ("attention", "not-ready", "expiring", "expired")
"""Values of ``?status=``: any problem, not ready, expiring within the hour, expired."""


@dataclasses.dataclass(frozen=True, slots=True)
class Links:
    """How a browser reaches the services, for the preview and "use this key" links.

    ``preview_domain``: the router's preview domain (``KEY--SERVICE.<domain>`` selects the key);
    None: no preview links. ``port``: the ingress port, None for the scheme's default.
    ``loopback``: the router listens on loopback (a laptop), so links prefer a service's
    ``*.localhost`` host, which browsers resolve to this machine.
    """

    preview_domain: str | None = None
    port: int | None = None
    scheme: str = "http"
    loopback: bool = False

    @classmethod
    def for_router(cls, preview_domain: str | None, address: tuple[str, int]) -> Links:
        """Links for a router whose proxy listener is bound to ``address``.

        On loopback, the browser talks to that listener directly, so its port is in every link;
        elsewhere the router sits behind an ingress or Service on the default port.
        """
        host, port = address[0], address[1]
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        return cls(preview_domain or None, port if loopback and port not in (0, 80) else None, "http", loopback)

    def authority(self, host: str) -> str:
        default = 443 if self.scheme == "https" else 80
        return host if self.port in (None, default) else f"{host}:{self.port}"

    def preview(self, service: str, key: str) -> str | None:
        """``http://KEY--SERVICE.<domain>[:port]/``, or None without a preview domain."""
        if not self.preview_domain:
            return None
        return f"{self.scheme}://{self.authority(f'{key}--{service}.{self.preview_domain}')}/"

    def use_key(self, routes: Routes, key: str) -> str:
        """``http://SERVICE-HOST[:port]/?devstack=KEY``: a router with the key cookie on answers
        with a cookie that routes this browser's later requests with ``key``."""
        return f"{self.scheme}://{self.authority(self.service_host(routes))}/?{urlencode({'devstack': key})}"

    def service_host(self, routes: Routes) -> str:
        """The host a browser uses to reach ``routes``' baseline through the router: one of the
        service's own hosts (the router routes only those), preferring a ``*.localhost`` name on
        loopback, then a name under the preview domain, then a name that is not cluster-internal."""
        hosts = (*routes.hosts, routes.service)
        if self.loopback:
            local = next((h for h in hosts if h.endswith(".localhost")), None)
            if local:
                return local
        if self.preview_domain:
            suffix = "." + self.preview_domain.strip(".")
            under = next((h for h in hosts if h.endswith(suffix)), None)
            if under:
                return under
        public = next((h for h in hosts if "." in h and not h.endswith(_INTERNAL)), None)
        return public or hosts[0]


_INTERNAL: Final = (".localhost", ".local", ".svc", ".internal", ".cluster")
"""Host suffixes a browser elsewhere cannot reach (``payments.default.svc.cluster.local``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SourceState:
    """One route source as the page shows it."""

    name: str
    age: float | None = None
    """Seconds since the source last confirmed its routes (a feed's heartbeats count); None: unknown."""
    failures: int = 0
    """Updates rejected and outages, ever."""
    error: str | None = None
    """Its latest rejected update or outage, while it lasts."""


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one rendering reads."""

    table: RouteTable
    now: float
    """Unix time the statuses and times left are computed at."""
    role: str = "router"
    """Who serves the page: ``router`` or ``controller``."""
    links: Links = Links()
    requests: Mapping[tuple[str, ...], int] | None = None
    """(service, target kind) → requests routed; None where nothing is counted (the controller)."""
    sources: Sequence[SourceState] = ()
    ready: bool = True
    problems: Sequence[str] = ()
    """Lines for the warning banner: conflicts, leaks, disconnected watches."""
    json_path: str = "routes"
    """Where the same table is served as JSON, relative to the page (it may sit behind a path prefix)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Fragments:
    """The page's live parts, each rendered once and sent as is by ``dashboard/events``."""

    version: int
    status: str
    summary: str
    banner: str
    services: tuple[tuple[str, str], ...]
    """(service name, its ``<tbody>``), in display order."""
    overrides: int


def override_status(ov: Override, now: float) -> tuple[str, bool]:
    """(``ready`` | ``not-ready`` | ``expiring`` | ``expired``, expires within the hour).

    Expired wins over not ready, as in routing; "expiring" is a ready override that expires
    within ``EXPIRING_SOON``.
    """
    left = None if ov.expires_at is None else ov.expires_at - now
    if left is not None and left <= 0:
        return "expired", False
    soon = left is not None and left <= EXPIRING_SOON
    if not ov.ready:
        return "not-ready", soon
    return ("expiring" if soon else "ready"), soon


def duration(seconds: float) -> str:
    """``42s``, ``14m``, ``2h 14m``, ``3d 4h``: two units at most, rounded down."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    minutes = s // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def _count(n: int) -> str:
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k" if n < 100_000 else f"{n // 1000}k"
    return f"{n / 1_000_000:.1f}M"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


_STATUS_LABELS: Final = {
    "attention": "needing attention",
    "not-ready": "not ready",
    "expiring": "expiring within 1 h",
    "expired": "expired",
}
_PILL_TEXT: Final = {"ready": "ready", "not-ready": "not ready", "expiring": "expiring soon", "expired": "expired"}
_PILL_ICON: Final = {"ready": "\u2713", "not-ready": "\u25cf", "expiring": "\u25f7", "expired": "\u2715"}


def _row(snap: Snapshot, routes: Routes, ov: Override) -> str:
    service, key = routes.service, ov.key
    status, soon = override_status(ov, snap.now)
    if ov.expires_at is None:
        left = '<span class="muted">no expiry</span>'
    elif status == "expired":
        left = f'<span title="{_iso(ov.expires_at)}">{duration(snap.now - ov.expires_at)} ago</span>'
    else:
        left = f'<span title="expires {_iso(ov.expires_at)}">{duration(ov.expires_at - snap.now)} left</span>'
    pill = f'<span class="pill {status}">{_PILL_ICON[status]} {_PILL_TEXT[status]}</span>'
    if status == "not-ready" and soon:
        pill += ' <span class="pill expiring">\u25f7 expiring soon</span>'
    # Said in words: a bare "503" beside "baseline" read like a count when looked at.
    fallback = "baseline" if ov.fallback is Fallback.BASELINE else "503 error"
    fallback_title = "while not ready or expired: " + (
        "the baseline serves this key" if fallback == "baseline" else "this key gets a 503 error"
    )
    owner = " / ".join(escape(part) for part in (ov.namespace, ov.workload) if part)
    owner_title = " / ".join(part for part in (ov.namespace, ov.workload) if part)
    owner = owner or '<span class="muted">\u2014</span>'
    preview = snap.links.preview(service, key)
    links = []
    if preview:
        links.append(f'<a href="{escape(preview)}" rel="noreferrer" title="{escape(preview)}">preview \u2197</a>')
    use = snap.links.use_key(routes, key)
    links.append(f'<a href="{escape(use)}" rel="noreferrer" class="use" title="{escape(use)}">use this key</a>')
    text = " ".join(part for part in (service, key, ov.namespace, ov.workload) if part).lower()
    return (
        f'<tr class="ov {status}" data-key="{escape(key)}" data-s="{status}"{" data-soon" if soon else ""}'
        f' data-text="{escape(text)}">'
        f'<td class="key">{escape(key)}</td><td class="st">{pill}</td><td class="left">{left}</td>'
        f'<td class="fb{" fb-base" if fallback == "baseline" else ""}" title="{fallback_title}">{fallback}</td>'
        f'<td class="owner" title="{escape(owner_title)}">{owner}</td>'
        f'<td class="up" title="{escape(ov.target.url)}">{escape(ov.target.url)}</td>'
        f'<td class="links">{" ".join(links)}</td></tr>'
    )


def _service(snap: Snapshot, routes: Routes) -> str:
    service = routes.service
    overrides = sorted(routes.overrides.values(), key=lambda ov: ov.key)
    hosts = ", ".join(escape(h) for h in routes.hosts if h != service)
    base_url = f"{snap.links.scheme}://{snap.links.authority(snap.links.service_host(routes))}/"
    # Only an unusual protocol is worth a word; HTTP/1.1 is every other service's.
    protocol = "" if routes.protocol == HTTP1 else f' <span class="lbl" title="protocol">{routes.protocol}</span>'
    cells = [
        f'<div class="who"><span class="name">{escape(service)}</span>'
        + (f' <span class="hosts" title="{hosts}">{hosts}</span>' if hosts else "")
        + "</div>",
        f'<div class="base"><span class="lbl">baseline</span> <code>{escape(routes.baseline.url)}</code>{protocol}'
        f' <a class="open" href="{escape(base_url)}" rel="noreferrer" title="{escape(base_url)}">open \u2197</a></div>',
    ]
    if snap.requests is not None:
        parts = []
        for kind in ("baseline", "override", "error"):
            n = snap.requests.get((service, kind), 0)
            if n or kind != "error":
                parts.append(f'<span class="n {kind}{" zero" if not n else ""}">{_count(n)} {kind}</span>')
        cells.append(
            '<div class="reqs" title="requests routed since the router started, by target">'
            f'<span class="lbl">requests</span> {" ".join(parts)}</div>'
        )
    else:
        cells.append('<div class="reqs"></div>')
    count = len(overrides)
    # Route groups that reach an override here, with the member they resolve to.
    via = [(group, routes.resolve(group, snap.now).via) for group in sorted(routes.groups)]
    groups = " ".join(
        f'<span class="grp" title="route group {escape(g)} resolves to {escape(m)} here">{escape(g)} → '
        f"{escape(m)}</span>"
        for g, m in via
        if m is not None
    )
    cells.append(
        f'<div class="ovn">{count} override{"" if count == 1 else "s"}{" " + groups if groups else ""}</div>'
        if count
        else '<div class="ovn muted">no overrides</div>'
    )
    rows = "".join(_row(snap, routes, ov) for ov in overrides)
    return (
        f'<tbody class="svc" data-service="{escape(service)}">'
        f'<tr class="sh"><th colspan="7"><div class="shw">{"".join(cells)}</div></th></tr>{rows}</tbody>'
    )


def _status_bar(snap: Snapshot) -> str:
    table = snap.table
    parts = [f'<span class="ver" title="route table version">table <b>v{table.version}</b></span>']
    if not snap.ready:
        parts.append('<span class="src bad">\u25cf not ready</span>')
    for source in snap.sources:
        if source.error:
            cls, text = "bad", "failing"
        elif source.age is None:
            cls, text = "", ""
        else:
            cls, text = "ok", f"{duration(source.age)} ago"
        if source.age is None:
            title = f"{source.name}: confirmation time unknown"
        else:
            title = f"{source.name}: last confirmed its routes {duration(source.age)} ago"
        if source.failures:
            title += f"; {source.failures} rejected update(s) or outage(s)"
        if source.error:
            title += f"; now: {source.error}"
        fails = f' <span class="fails">{source.failures}\u2717</span>' if source.failures else ""
        parts.append(
            f'<span class="src {cls}" title="{escape(title)}"><span class="dot"></span>{escape(source.name)}'
            f"{' <i>' + text + '</i>' if text else ''}{fails}</span>"
        )
    return "".join(parts)


def _counts(snap: Snapshot) -> dict[str, int]:
    counts = {"services": len(snap.table.services), "overrides": 0, "not-ready": 0, "expiring": 0, "expired": 0}
    for routes in snap.table.services.values():
        for ov in routes.overrides.values():
            status, soon = override_status(ov, snap.now)
            counts["overrides"] += 1
            if status in ("not-ready", "expired"):
                counts[status] += 1
            if soon:
                counts["expiring"] += 1
    return counts


def _summary(snap: Snapshot, query: str = "", active: str = "") -> str:
    counts = _counts(snap)

    def chip(filter_: str, label: str, n: int, cls: str) -> str:
        href = "?" + urlencode({k: v for k, v in (("q", query), ("status", filter_)) if v})
        on = " on" if active and active == filter_ else ""
        zero = " zero" if n == 0 and cls else ""
        return f'<a class="chip {cls}{zero}{on}" data-f="{filter_}" href="{escape(href)}"><b>{n}</b> {label}</a>'

    chips = [
        chip("", "services", counts["services"], ""),
        chip("", "overrides", counts["overrides"], ""),
        chip("not-ready", "not ready", counts["not-ready"], "not-ready"),
        chip("expiring", "expiring within 1 h", counts["expiring"], "expiring"),
        chip("expired", "expired", counts["expired"], "expired"),
    ]
    if snap.requests is not None:
        total = sum(n for (service, _), n in snap.requests.items() if service != "-")
        chips.append(
            '<span class="chip plain" title="requests routed since the router started">'
            f"<b>{_count(total)}</b> requests</span>"
        )
    return "".join(chips)


def _banner(snap: Snapshot) -> str:
    lines = [f"{s.name}: {s.error}" for s in snap.sources if s.error] + list(snap.problems)
    if not lines:
        return ""
    shown = "".join(f"<li>{escape(line)}</li>" for line in lines[:20])
    more = f"<li>\u2026 and {len(lines) - 20} more</li>" if len(lines) > 20 else ""
    title = f"\u26a0 {len(lines)} problem{'' if len(lines) == 1 else 's'}"
    return f'<div class="warn"><strong>{title}</strong><ul>{shown}{more}</ul></div>'


def fragments(snap: Snapshot) -> Fragments:
    services = tuple((name, _service(snap, snap.table.services[name])) for name in sorted(snap.table.services))
    overrides = sum(len(r.overrides) for r in snap.table.services.values())
    return Fragments(snap.table.version, _status_bar(snap), _summary(snap), _banner(snap), services, overrides)


def _filtered(snap: Snapshot, query: str, status: str) -> tuple[tuple[tuple[str, str], ...], int]:
    """The services and rows ``?q=`` and ``?status=`` select, the way the script filters."""
    terms = query.lower().split()
    selected: list[tuple[str, str]] = []
    shown = 0
    for name in sorted(snap.table.services):
        routes = snap.table.services[name]
        name_hit = all(t in name for t in terms)
        kept = []
        for ov in routes.overrides.values():
            st, soon = override_status(ov, snap.now)
            text = " ".join(p for p in (name, ov.key, ov.namespace, ov.workload) if p).lower()
            if not (name_hit or all(t in text for t in terms)):
                continue
            if status and not _status_matches(status, st, soon):
                continue
            kept.append(ov)
        if kept or (name_hit and not status):
            sub = dataclasses.replace(routes, overrides={ov.key: ov for ov in kept})
            selected.append((name, _service(snap, sub)))
            shown += len(kept)
    return tuple(selected), shown


def _status_matches(wanted: str, status: str, soon: bool) -> bool:
    if wanted == "attention":
        return status != "ready" or soon
    if wanted == "expiring":
        return soon
    return wanted == status


def render_page(snap: Snapshot, *, query: str = "", status: str = "") -> str:
    """The whole page; ``query`` and ``status`` (one of ``STATUS_FILTERS``) filter it server-side."""
    started = time.perf_counter()
    status = status if status in STATUS_FILTERS else ""
    query = query.strip()[:200]
    frags = fragments(snap)
    if query or status:
        services, shown = _filtered(snap, query, status)
    else:
        services, shown = frags.services, frags.overrides
    body = "".join(html for _, html in services)
    if not services:
        body = '<tbody class="none"><tr><td colspan="7">No service or override matches this filter.</td></tr></tbody>'
    filtered = bool(query or status)
    count = f"{shown} of {frags.overrides} overrides" if filtered else f"{frags.overrides} overrides"
    if status:
        count += f" \u00b7 {_STATUS_LABELS[status]}"
    hidden_status = f'<input type="hidden" name="status" value="{escape(status)}">' if status else ""
    clear = '<a class="clear" href="?">clear</a>' if filtered else ""
    role = escape(snap.role)
    elapsed = (time.perf_counter() - started) * 1000
    return _PAGE.format(
        title=f"devstack {role} \u00b7 v{frags.version}",
        role=role,
        status=frags.status,
        summary=_summary(snap, query, status),
        banner=frags.banner,
        query=escape(query),
        hidden_status=hidden_status,
        clear=clear,
        count=count,
        services=body,
        rendered=_iso(snap.now).replace(" UTC", ""),
        elapsed=f"{elapsed:.1f}",
        json_path=escape(snap.json_path),
        counts_note=" Request counts are since the router started." if snap.requests is not None else "",
        style=_STYLE,
        script=_SCRIPT,
    )


def event(frags: Fragments, sent: dict[str, str], now: float) -> bytes:
    """One server-sent event carrying what changed since ``sent`` (updated in place).

    ``sent`` maps each fragment's name (``status``, ``summary``, ``banner``, ``svc:NAME``) to what
    this stream last sent, so an idle table costs a few bytes per tick and a big one is not
    re-sent whole because one counter moved.
    """
    payload: dict[str, object] = {"version": frags.version, "now": now, "order": [name for name, _ in frags.services]}
    for name in ("status", "summary", "banner"):
        text = getattr(frags, name)
        if sent.get(name) != text:
            payload[name] = sent[name] = text
    changed: dict[str, str] = {}
    live = set()
    for name, html in frags.services:
        live.add(name)
        if sent.get("svc:" + name) != html:
            changed[name] = sent["svc:" + name] = html
    for stale in [k for k in sent if k.startswith("svc:") and k[4:] not in live]:
        del sent[stale]
    payload["services"] = changed
    return b"event: update\ndata: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def sources_from(
    names: Iterable[str],
    confirmed: Mapping[str, float] | None,
    failures: Mapping[str, int] | None,
    errors: object,
    monotonic_now: float,
) -> tuple[SourceState, ...]:
    """Source states from the counters both processes keep (``time.monotonic`` confirmations,
    failure counts, and the ``errors`` mapping of their ``/readyz`` detail)."""
    confirmed = confirmed or {}
    failures = failures or {}
    error_map = {str(k): str(v) for k, v in errors.items()} if isinstance(errors, Mapping) else {}
    ordered = list(dict.fromkeys([*names, *confirmed, *error_map]))
    return tuple(
        SourceState(
            name,
            None if name not in confirmed else max(0.0, monotonic_now - confirmed[name]),
            failures.get(name, 0),
            error_map.get(name),
        )
        for name in ordered
    )


_STYLE: Final = """
:root{--bg:#f5f6f8;--panel:#fff;--text:#1d2127;--muted:#667080;--line:#e1e5ea;--head:#eef1f5;
--accent:#0b63c5;--ok:#17753a;--ok-bg:#e3f4e8;--bad:#b42318;--bad-bg:#fdecea;--soon:#8a5a00;--soon-bg:#fff4d6;
--dead:#5b6470;--dead-bg:#eceff3;
--mono:ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"Liberation Mono",monospace;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#111418;--panel:#181c21;--text:#e4e7eb;--muted:#9aa3ae;--line:#2a3038;
--head:#1f242b;--accent:#6cb2ff;--ok:#5fd08a;--ok-bg:#15301f;--bad:#ff8a80;--bad-bg:#3a1a18;--soon:#f2c35b;
--soon-bg:#352a10;--dead:#a3abb5;--dead-bg:#252a31}}
*{box-sizing:border-box}
html{font-size:14px}
body{margin:0;background:var(--bg);color:var(--text);line-height:1.45;
font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","Noto Sans","Liberation Sans",Arial,sans-serif;
-webkit-font-smoothing:antialiased;font-variant-numeric:tabular-nums}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
code,.key,.up,.hosts{font-family:var(--mono);font-size:.92em}
.muted{color:var(--muted)}
header.top{position:sticky;top:0;z-index:5;background:var(--panel);border-bottom:1px solid var(--line);
box-shadow:0 1px 3px rgba(16,24,40,.06)}
.bar{display:flex;align-items:center;gap:18px;padding:10px 24px;flex-wrap:wrap}
.brand{font-size:17px;font-weight:650;letter-spacing:-.01em;white-space:nowrap}
.brand .role{font-weight:500;color:var(--muted);margin-left:6px}
.status{display:flex;gap:8px;align-items:center;flex-wrap:wrap;flex:1}
.ver{font-size:13px;color:var(--muted);margin-right:4px}.ver b{color:var(--text);font-size:15px}
.src{display:inline-flex;align-items:center;gap:6px;border:1px solid var(--line);border-radius:999px;
padding:2px 10px;font-size:12.5px;white-space:nowrap}
.src i{font-style:normal;color:var(--muted)}
.src .dot{width:7px;height:7px;border-radius:50%;background:var(--muted)}
.src.ok .dot{background:var(--ok)}
.src.bad{border-color:var(--bad);color:var(--bad);background:var(--bad-bg)}.src.bad .dot{background:var(--bad)}
.src .fails{color:var(--bad);font-size:11.5px}
.live{font-size:12.5px;color:var(--muted);white-space:nowrap;display:inline-flex;align-items:center;gap:6px}
.live::before{content:"";width:8px;height:8px;border-radius:50%;background:var(--muted)}
.live.on::before{background:var(--ok);box-shadow:0 0 0 3px var(--ok-bg)}
.live.off{color:var(--bad)}.live.off::before{background:var(--bad)}
.bar2{display:flex;align-items:center;gap:16px;padding:0 24px 10px;flex-wrap:wrap}
.chips{display:flex;gap:8px;flex-wrap:wrap;flex:1}
.chip{display:inline-flex;align-items:baseline;gap:5px;padding:4px 11px;border-radius:8px;border:1px solid var(--line);
background:var(--panel);color:var(--text);font-size:13px;white-space:nowrap}
.chip b{font-size:15px}
a.chip:hover{text-decoration:none;border-color:var(--accent)}
.chip.not-ready{border-color:var(--bad);background:var(--bad-bg);color:var(--bad)}
.chip.expiring{border-color:#d9a520;background:var(--soon-bg);color:var(--soon)}
.chip.expired{background:var(--dead-bg);color:var(--dead)}
.chip.zero{border-color:var(--line);background:var(--panel);color:var(--muted)}
.chip.on{outline:2px solid var(--accent);outline-offset:1px}
.chip.plain{color:var(--muted)}
form.filter{display:flex;gap:8px;align-items:center}
form.filter input[type=search]{width:320px;max-width:60vw;font:inherit;padding:6px 10px;border:1px solid var(--line);
border-radius:8px;background:var(--bg);color:var(--text)}
form.filter input:focus{outline:2px solid var(--accent);outline-offset:-1px;background:var(--panel)}
form.filter button{font:inherit;padding:5px 12px;border:1px solid var(--line);border-radius:8px;background:var(--panel);
color:var(--text);cursor:pointer}
.js form.filter button{display:none}
.count{color:var(--muted);font-size:12.5px;white-space:nowrap}
.clear{font-size:12.5px}
main{padding:16px 24px 32px}
.warn{border:1px solid var(--bad);background:var(--bad-bg);color:var(--bad);border-radius:10px;padding:10px 14px;
margin-bottom:14px}
.warn ul{margin:4px 0 0;padding-left:20px;color:var(--text)}
table.routes{width:100%;border-collapse:separate;border-spacing:0;background:var(--panel);border:1px solid var(--line);
border-radius:10px}
thead th{font-size:11.5px;text-transform:uppercase;letter-spacing:.06em;color:var(--muted);font-weight:600;
text-align:left;padding:8px 12px;border-bottom:1px solid var(--line);position:sticky;top:var(--top,92px);z-index:4;
background:var(--panel)}
thead th:first-child{border-top-left-radius:10px}thead th:last-child{border-top-right-radius:10px}
tbody.svc tr.sh th{background:var(--head);text-align:left;font-weight:400;padding:9px 12px;
border-top:1px solid var(--line)}
tbody.svc:first-of-type tr.sh th{border-top:0}
.shw{display:grid;grid-template-columns:minmax(180px,1.1fr) minmax(280px,1.7fr) minmax(240px,1.2fr) 100px;
gap:2px 24px;align-items:baseline}
.shw>div{min-width:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.who .name{font-size:15px;font-weight:650;margin-right:6px}
.hosts{color:var(--muted);font-size:12px}
.lbl{color:var(--muted);font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;margin-right:4px}
.base code{font-size:12.5px}
.base .open{font-size:12.5px;margin-left:6px}
.reqs{font-size:13px}
.reqs .n{margin-right:10px;white-space:nowrap}
.reqs .n.zero{color:var(--muted)}
.reqs .n.override{color:var(--accent)}.reqs .n.override.zero{color:var(--muted)}
.reqs .n.error{color:var(--bad);font-weight:600}
.ovn{text-align:right;color:var(--text);font-size:13px}
.grp{margin-left:8px;padding:1px 6px;border:1px solid var(--line);border-radius:10px;font-size:12px;
white-space:nowrap}
td{padding:7px 12px;border-top:1px solid var(--line);vertical-align:middle;font-size:13.5px}
tr.ov:hover td{background:rgba(11,99,197,.045)}
td.key{font-weight:600;white-space:nowrap;width:1%;padding-right:28px}
td.st{white-space:nowrap;width:1%;padding-right:28px}
td.left{white-space:nowrap;color:var(--muted);width:1%;padding-right:28px}
td.fb{color:var(--muted);white-space:nowrap;width:1%;padding-right:28px}td.fb-base{color:var(--text)}
td.owner{color:var(--muted);font-size:13px;max-width:280px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
td.up{color:var(--muted);max-width:320px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font-size:12.5px}
td.links{white-space:nowrap;text-align:right;width:1%}
td.links a{margin-left:12px;font-size:13px}
.pill{display:inline-block;padding:1px 9px;border-radius:999px;font-size:12.5px;font-weight:600;white-space:nowrap}
.pill.ready{background:var(--ok-bg);color:var(--ok)}
.pill.not-ready{background:var(--bad);color:var(--panel)}
.pill.expiring{background:var(--soon-bg);color:var(--soon);border:1px solid #d9a520}
.pill.expired{background:var(--dead-bg);color:var(--dead)}
tr.ov.not-ready td{background:var(--bad-bg)}
tr.ov.not-ready td:first-child{box-shadow:inset 4px 0 0 var(--bad)}
tr.ov.expiring td{background:var(--soon-bg)}
tr.ov.expiring td:first-child{box-shadow:inset 4px 0 0 #d9a520}
tr.ov.expiring td.left{color:var(--soon);font-weight:600}
tr.ov.not-ready td.left{color:var(--text)}
tr.ov.expired td{color:var(--dead)}
tr.ov.expired td.key{text-decoration:line-through;text-decoration-color:var(--muted)}
tr.ov.expired td:first-child{box-shadow:inset 4px 0 0 var(--dead)}
tbody.none td{padding:24px;text-align:center;color:var(--muted)}
footer{padding:0 24px 24px;color:var(--muted);font-size:12.5px}
footer a{color:var(--muted);text-decoration:underline}
@media (max-width:900px){td.up,td.owner,thead th.up,thead th.owner{display:none}
.bar,.bar2,main{padding-left:12px;padding-right:12px}}
"""

_SCRIPT: Final = r"""
(function(){
"use strict";
var d=document, q=d.getElementById("q"), table=d.getElementById("routes"), live=d.getElementById("live"),
    count=d.getElementById("count"), params=new URLSearchParams(location.search),
    status=params.get("status")||"", last=0, sent={},
    LABELS={"attention":"needing attention","not-ready":"not ready","expiring":"expiring within 1 h",
            "expired":"expired"};
d.documentElement.classList.add("js");
function pin(){ d.documentElement.style.setProperty("--top",d.querySelector("header.top").offsetHeight+"px"); }
pin(); window.addEventListener("resize",pin);
function matches(tr,terms,nameHit){
  if(!(nameHit||terms.every(function(t){return tr.dataset.text.indexOf(t)>=0;})))return false;
  var s=tr.dataset.s, soon=tr.hasAttribute("data-soon");
  if(!status)return true;
  if(status==="attention")return s!=="ready"||soon;
  if(status==="expiring")return soon;
  return s===status;
}
function apply(){
  var terms=q.value.toLowerCase().split(/\s+/).filter(Boolean), shown=0, total=0, any=false;
  Array.prototype.forEach.call(table.tBodies,function(tb){
    var name=tb.dataset.service; if(name===undefined){tb.hidden=true;return;}
    var nameHit=terms.every(function(t){return name.indexOf(t)>=0;}), kept=0;
    Array.prototype.forEach.call(tb.querySelectorAll("tr.ov"),function(tr){
      var ok=matches(tr,terms,nameHit); tr.hidden=!ok; total++; if(ok)kept++;
    });
    shown+=kept; tb.hidden=!(kept||(nameHit&&!status)); if(!tb.hidden)any=true;
  });
  count.textContent=(terms.length||status?shown+" of "+total:total)+" overrides"+
    (status?" \u00b7 "+(LABELS[status]||status):"")+(any?"":" \u2014 nothing matches");
  Array.prototype.forEach.call(d.querySelectorAll(".chip[data-f]"),function(c){
    c.classList.toggle("on",!!status&&c.dataset.f===status);
  });
  var p=new URLSearchParams(); if(q.value.trim())p.set("q",q.value.trim()); if(status)p.set("status",status);
  var s=p.toString(); history.replaceState(null,"",s?"?"+s:location.pathname);
}
function patch(m){
  ["status","summary","banner"].forEach(function(id){ if(m[id]!==undefined)d.getElementById(id).innerHTML=m[id]; });
  var have={};
  Array.prototype.forEach.call(table.tBodies,function(tb){
    if(tb.dataset.service===undefined)tb.remove(); else have[tb.dataset.service]=tb;
  });
  var prev=table.tHead;
  m.order.forEach(function(name){
    var tb=have[name], html=m.services[name];
    delete have[name];
    if(html!==undefined&&tb&&html===sent[name])html=undefined;  // unchanged: keep the node (and any selection)
    if(html!==undefined||!tb||sent[name]===undefined){
      if(html===undefined)html=sent[name];
      if(html!==undefined){
        var t=d.createElement("template"); t.innerHTML=html; var fresh=t.content.firstElementChild;
        if(tb)tb.replaceWith(fresh); tb=fresh; sent[name]=html;
      }
    }
    if(tb){ if(prev.nextElementSibling!==tb)prev.after(tb); prev=tb; }
  });
  Object.keys(have).forEach(function(name){ have[name].remove(); delete sent[name]; });
  d.title=d.title.replace(/v\d+$/,"v"+m.version);
  apply();
}
function tick(){
  if(!last)return;
  var age=Math.round((Date.now()-last)/1000);
  live.lastChild.textContent=live.classList.contains("on")?(age<3?"live":"live \u00b7 updated "+age+"s ago")
    :"reconnecting \u00b7 last update "+age+"s ago";
}
q.addEventListener("input",apply);
d.getElementById("filter").addEventListener("submit",function(e){e.preventDefault();apply();});
d.getElementById("summary").addEventListener("click",function(e){
  var c=e.target.closest(".chip[data-f]"); if(!c)return; e.preventDefault();
  status=(c.dataset.f===status)?"":c.dataset.f; apply();
});
d.addEventListener("keydown",function(e){
  if(e.key==="/"&&d.activeElement!==q){e.preventDefault();q.focus();q.select();}
  else if(e.key==="Escape"&&d.activeElement===q){q.value="";apply();}
});
if(window.EventSource){
  var es=new EventSource("dashboard/events");
  es.addEventListener("update",function(e){
    patch(JSON.parse(e.data)); last=Date.now(); live.className="live on"; tick();
  });
  es.onerror=function(){ live.className="live off"; tick(); if(!last)live.lastChild.textContent="reconnecting"; };
  setInterval(tick,1000);
}
apply();
})();
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY: Final = (
    f"default-src 'none'; style-src {_hash(_STYLE)}; script-src {_hash(_SCRIPT)}; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""Only this page's own inline style and script run, and it reaches nothing but its own origin:
the page works offline by construction, and an escaping slip could not run a script."""

_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<noscript><meta http-equiv="refresh" content="30"></noscript>
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header class="top">
<div class="bar">
<div class="brand">devstack<span class="role">{role}</span></div>
<div class="status" id="status">{status}</div>
<span class="live" id="live"><span>snapshot {rendered} UTC</span></span>
</div>
<div class="bar2">
<nav class="chips" id="summary" aria-label="summary">{summary}</nav>
<form class="filter" id="filter" method="get" role="search">
<input id="q" name="q" type="search" value="{query}" placeholder="Filter by key or service  ( / )" autocomplete="off"
 aria-label="Filter by key or service">{hidden_status}<button type="submit">Filter</button>
<span class="count" id="count">{count}</span>{clear}
</form>
</div>
</header>
<main>
<div id="banner">{banner}</div>
<table class="routes" id="routes">
<thead><tr><th>Key</th><th>Status</th><th>Time left</th><th>Fallback</th><th class="owner">Owner</th>
<th class="up">Upstream</th><th></th></tr></thead>
{services}
</table>
</main>
<footer>Rendered at {rendered} UTC in {elapsed} ms.{counts_note}
The same table as JSON: <a href="{json_path}">{json_path}</a>. Without JavaScript this page reloads every 30 s.</footer>
<script>{script}</script>
</body>
</html>
"""
