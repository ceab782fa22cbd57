"""The browser extension (``extension/``), checked without a browser.

Statically: the manifest is Manifest V3 with the permissions the rule needs, every file it (and
the popup, and each module's imports) names exists, and nothing loads or evaluates remote or
inline code. With ``node`` (skipped without it): ``rules.js`` builds the rule the router expects,
validates keys exactly as the router does, and needs no host permission beyond the manifest's for
its default hosts; ``background.js`` runs against an in-memory stand-in of the ``chrome.*`` APIs
it uses, driven the way the popup and an end-to-end test drive it. ``make extension`` zips it with
``manifest.json`` at the root. The real thing (headless Chromium with the extension loaded) is
another test's job.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from router.keys import is_valid_key

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "extension"
MANIFEST = EXT / "manifest.json"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")

REQUIRED_TYPES = {
    "main_frame", "sub_frame", "xmlhttprequest", "websocket", "image", "script", "stylesheet", "font",
    "media", "ping", "other",
}  # fmt: skip
DEFAULT_HOST_PERMISSIONS = {
    f"{scheme}://{host}/*" for scheme in ("http", "ws") for host in ("*.localhost", "localhost", "127.0.0.1")
}
"""Granted at install. ws too: with http(s) access only, Chromium leaves WebSocket handshakes
unmodified (measured in headless Chromium with the demo page: fetches carried the key, the socket
did not)."""


def manifest() -> dict[str, Any]:
    data = json.loads(MANIFEST.read_text())
    assert isinstance(data, dict)
    return data


def sources(suffix: str) -> list[Path]:
    return sorted(EXT.rglob(f"*{suffix}"))


def covered(origin: str, granted: set[str]) -> bool:
    """Whether a match pattern ``http://host/*`` is within the granted ones (``*`` scheme: http and
    https, not ws; ``*.domain`` also matches the domain itself, as in Chrome)."""
    scheme, _, rest = origin.partition("://")
    host = rest.split("/", 1)[0]
    for pattern in granted:
        p_scheme, _, p_rest = pattern.partition("://")
        p_host = p_rest.split("/", 1)[0]
        if not (p_scheme == scheme or (p_scheme == "*" and scheme in ("http", "https"))) or not p_rest.endswith("/*"):
            continue
        if p_host == host or (p_host.startswith("*.") and (host == p_host[2:] or host.endswith(p_host[1:]))):
            return True
    return False


# -- static --------------------------------------------------------------------------------------


def test_manifest_is_v3_with_the_permissions_the_rule_needs() -> None:
    m = manifest()
    assert m["manifest_version"] == 3
    assert m["name"] and re.fullmatch(r"\d+(\.\d+){0,3}", m["version"])
    permissions = set(m["permissions"])
    assert permissions & {"declarativeNetRequest", "declarativeNetRequestWithHostAccess"}
    assert "storage" in permissions
    assert not permissions & {"webRequest", "webRequestBlocking", "tabs", "cookies", "<all_urls>"}
    granted = set(m["host_permissions"])
    assert all(covered(origin, granted) for origin in DEFAULT_HOST_PERMISSIONS), granted
    assert m["optional_host_permissions"] == ["<all_urls>"]  # the staging domains, asked for from the popup
    assert m["background"] == {"service_worker": "background.js", "type": "module"}
    assert m["action"]["default_popup"] == "popup.html"
    assert "content_scripts" not in m and "externally_connectable" not in m


def _referenced() -> set[Path]:
    m = manifest()
    names = {m["background"]["service_worker"], m["action"]["default_popup"]}
    names |= set(m["icons"].values()) | set(m["action"].get("default_icon", {}).values())
    found = {EXT / name for name in names}
    for html in sources(".html"):
        for ref in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html.read_text()):
            found.add(html.parent / ref)
    for js in sources(".js"):
        for ref in re.findall(r"""(?:^|\s)(?:import|export)\b[^'"]*?from\s*['"]([^'"]+)['"]""", js.read_text(), re.M):
            found.add(js.parent / ref)
    return found


def test_every_file_the_extension_names_exists_and_nothing_else_is_shipped() -> None:
    referenced = _referenced()
    missing = [str(p.relative_to(EXT)) for p in referenced if not p.resolve().is_file()]
    assert not missing, missing
    assert all(p.resolve().is_relative_to(EXT) for p in referenced)
    shipped = {p for p in EXT.rglob("*") if p.is_file()}
    unused = shipped - {p.resolve() for p in referenced} - {MANIFEST}
    assert not unused, sorted(str(p.relative_to(EXT)) for p in unused)


def test_no_remote_or_inline_code() -> None:
    """MV3 forbids remote code and its CSP forbids inline scripts; eval and friends are out too."""
    for html in sources(".html"):
        text = html.read_text()
        for attrs, body in re.findall(r"<script\b([^>]*)>(.*?)</script>", text, re.S | re.I):
            assert "src=" in attrs and not body.strip(), f"{html.name}: inline script"
        assert not re.search(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", text, re.I), f"{html.name}: remote resource"
        assert not re.search(r"\son[a-z]+\s*=", text, re.I), f"{html.name}: inline event handler"
        assert not re.search(r"<style\b|\sstyle\s*=", text, re.I), f"{html.name}: inline CSS"
    for js in sources(".js"):
        text = js.read_text()
        assert not re.search(r"\beval\s*\(|\bnew\s+Function\b|\bFunction\s*\(", text), js.name
        assert not re.search(r"""\b(?:setTimeout|setInterval)\s*\(\s*['"`]""", text), js.name
        assert not re.search(r"""\bimport\s*\(""", text), f"{js.name}: dynamic import"
        assert not re.search(r"""from\s*['"](?!\./)""", text), f"{js.name}: imports only ./ modules"
        assert not re.search(r"importScripts|document\.write|innerHTML|<script", text), js.name
        assert not re.search(r"https?://(?!\*)", text), f"{js.name}: a remote URL"
    for css in sources(".css"):
        assert not re.search(r"@import|url\s*\(", css.read_text()), css.name


def test_rule_lists_every_resource_type_textually() -> None:
    """Holds without node: the resource types in rules.js, as written."""
    block = re.search(r"RESOURCE_TYPES = Object\.freeze\(\[(.*?)\]\)", (EXT / "rules.js").read_text(), re.S)
    assert block is not None
    types = set(re.findall(r"'([a-z_]+)'", block.group(1)))
    assert types >= REQUIRED_TYPES, REQUIRED_TYPES - types


def test_background_documents_how_a_test_drives_it() -> None:
    head = (EXT / "background.js").read_text().split("import", 1)[0]
    for call in ("devstack.setKey(", "devstack.clearKey()", "devstack.getState()", "{type: 'setKey',", "popup.html"):
        assert call in head, call


def test_make_extension_zips_it_with_the_manifest_at_the_root(tmp_path: Path) -> None:
    out = tmp_path / "out" / "devstack-extension.zip"
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "extension", f"EXTENSION_ZIP={out}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(out) as zf:
        names = {n for n in zf.namelist() if not n.endswith("/")}
        assert json.loads(zf.read("manifest.json")) == manifest()
    assert names == {str(p.relative_to(EXT)) for p in EXT.rglob("*") if p.is_file()}


# -- with node -----------------------------------------------------------------------------------


def run_node(script: str) -> Any:
    """Runs an ES module script (``EXT`` is the extension's file URL) and returns what it printed as JSON."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script.replace("EXT", EXT.as_uri())],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_node
def test_the_rule_sets_the_key_header_on_every_resource_type() -> None:
    out = run_node("""
        import * as r from 'EXT/rules.js';
        const fail = (f) => { try { f(); return null; } catch (e) { return e.message; } };
        console.log(JSON.stringify({
          rule: r.buildRule('alice', r.DEFAULT_PATTERNS),
          staging: r.buildRule('bob', ['*.staging.example.com', 'api.example.com', '10.0.0.7', 'localhost']),
          defaults: r.DEFAULT_PATTERNS,
          origins: r.originsFor(r.DEFAULT_PATTERNS),
          badge: [r.badgeText('alice'), r.badgeText('bob'), r.badgeText(null)],
          badKey: fail(() => r.buildRule('Alice', r.DEFAULT_PATTERNS)),
          noHosts: fail(() => r.buildRule('alice', [])),
          badHost: fail(() => r.buildRule('alice', ['http://x.example.com:8080/'])),
        }));
    """)
    rule = out["rule"]
    assert rule["id"] == 1
    assert rule["action"] == {
        "type": "modifyHeaders",
        "requestHeaders": [{"header": "x-devstack-key", "operation": "set", "value": "alice"}],
    }
    assert set(rule["condition"]["resourceTypes"]) >= REQUIRED_TYPES
    assert rule["condition"]["requestDomains"] == ["localhost"]  # covers *.localhost as well
    staging = ["staging.example.com", "api.example.com", "10.0.0.7", "localhost"]
    assert out["staging"]["condition"]["requestDomains"] == staging
    assert out["defaults"] == ["*.localhost", "localhost"]
    # The default hosts are granted at install, so saving them needs no prompt (and no gesture).
    assert set(out["origins"]) <= set(manifest()["host_permissions"])
    assert out["badge"] == ["alic", "bob", ""]
    assert "a-z" in out["badKey"]
    assert "no host" in out["noHosts"]
    assert "without scheme" in out["badHost"]


@needs_node
def test_keys_and_host_patterns_are_validated_as_the_router_does() -> None:
    keys = ["alice", "a", "a-b", "a" * 63, "a" * 64, "", "-a", "a-", "Alice", "al_ice", "al.ice", "9", "é", "a b"]
    patterns = [
        "localhost", "*.localhost", " API.Example.COM. ", "127.0.0.1", "256.1.1.1", "*.", "*", "a..b",
        "-x.com", "x-.com", "https://x.com", "x.com:8080", "x.com/path", "*.*.x.com", "xn--bcher-kva.example",
    ]  # fmt: skip
    out = run_node(f"""
        import * as r from 'EXT/rules.js';
        console.log(JSON.stringify({{
          keys: {json.dumps(keys)}.map((k) => r.keyError(k) === null),
          patterns: {json.dumps(patterns)}.map((p) => r.parsePatterns([p])),
          text: r.parsePatterns('*.localhost\\n\\n localhost \\nlocalhost\\n*.staging.example.com'),
        }}));
    """)
    assert out["keys"] == [is_valid_key(k.encode()) for k in keys]
    accepted = [p for p, parsed in zip(patterns, out["patterns"], strict=True) if not parsed["errors"]]
    assert accepted == ["localhost", "*.localhost", " API.Example.COM. ", "127.0.0.1", "xn--bcher-kva.example"]
    assert out["patterns"][2]["patterns"] == ["api.example.com"]
    assert out["text"] == {"patterns": ["*.localhost", "localhost", "*.staging.example.com"], "errors": []}


# An in-memory chrome.* with what background.js uses: dynamic rules (validated as Chromium does for
# the fields the rule uses), storage, badge, permissions and the runtime events.
FAKE_CHROME = """
const listeners = { message: [], startup: [], installed: [] };
const event = (name) => ({ addListener: (f) => listeners[name].push(f) });
const store = {};
let rules = [];
const badge = { text: '', title: '', color: null };
const granted = new Set(MANIFEST.host_permissions);
const TYPES = new Set(['main_frame', 'sub_frame', 'stylesheet', 'script', 'image', 'font', 'object',
  'xmlhttprequest', 'ping', 'csp_report', 'media', 'websocket', 'webtransport', 'webbundle', 'other']);
globalThis.chrome = {
  runtime: { id: 'ext', onMessage: event('message'), onStartup: event('startup'), onInstalled: event('installed'),
             getManifest: () => MANIFEST },
  storage: { local: {
    get: async (k) => (k in store ? { [k]: structuredClone(store[k]) } : {}),
    set: async (o) => { Object.assign(store, structuredClone(o)); },
  } },
  declarativeNetRequest: {
    getDynamicRules: async () => structuredClone(rules),
    updateDynamicRules: async ({ removeRuleIds = [], addRules = [] }) => {
      for (const rule of addRules) {
        if (!Number.isInteger(rule.id) || rule.id < 1) throw new Error('bad id');
        for (const t of rule.condition.resourceTypes ?? []) if (!TYPES.has(t)) throw new Error('bad type ' + t);
        for (const h of rule.action.requestHeaders ?? []) {
          if (h.operation === 'append' && h.header === 'baggage') throw new Error('append not allowed');
          if (h.operation === 'set' && typeof h.value !== 'string') throw new Error('no value');
        }
        for (const d of rule.condition.requestDomains ?? []) {
          if (d !== d.toLowerCase() || d === '') throw new Error('bad domain');
        }
      }
      const kept = rules.filter((r) => !removeRuleIds.includes(r.id));
      for (const rule of addRules) if (kept.some((r) => r.id === rule.id)) throw new Error('duplicate id');
      rules = [...kept, ...structuredClone(addRules)];
    },
  },
  action: {
    setBadgeText: async ({ text }) => { badge.text = text; },
    setBadgeBackgroundColor: async ({ color }) => { badge.color = color; },
    setTitle: async ({ title }) => { badge.title = title; },
  },
  permissions: { contains: async ({ origins }) => origins.every((o) => granted.has(o)) },
};
const send = (message, sender = { id: 'ext' }) => new Promise((resolve) => {
  const async = listeners.message[0](message, sender, resolve);
  if (!async) resolve(undefined);
});
const snapshot = () => structuredClone({ rules, store, badge });
"""


@needs_node
def test_the_service_worker_owns_the_rule_the_badge_and_the_stored_key() -> None:
    script = (
        f"const MANIFEST = {MANIFEST.read_text()};\n"
        + FAKE_CHROME
        + """
        await import('EXT/background.js');
        const steps = {};
        await Promise.all(listeners.installed.map((f) => f({ reason: 'install' })));
        steps.installed = snapshot();
        steps.set = await send({ type: 'setKey', key: 'alice', patterns: ['*.localhost', 'localhost'] });
        steps.afterSet = snapshot();
        steps.bad = await send({ type: 'setKey', key: 'Not-A-Key', patterns: ['localhost'] });
        steps.afterBad = snapshot();
        steps.foreign = (await send({ type: 'clearKey' }, { id: 'someone-else' })) ?? null;
        steps.staging = await globalThis.devstack.setKey('bob', ['*.staging.example.com']);
        steps.clear = await send({ type: 'clearKey' });
        steps.afterClear = snapshot();
        // A browser start: dynamic rules survive, the badge does not; restore puts both back.
        await globalThis.devstack.setKey('carol-2', ['*.localhost']);
        badge.text = ''; rules = [];
        await Promise.all(listeners.startup.map((f) => f()));
        steps.restored = snapshot();
        steps.state = (await send({ type: 'getState' })).state;
        console.log(JSON.stringify(steps));
    """
    )
    out = run_node(script)
    assert out["installed"]["rules"] == [] and out["installed"]["badge"]["text"] == ""

    assert out["set"]["ok"] is True
    state = out["set"]["state"]
    assert (state["key"], state["patterns"], state["permitted"]) == ("alice", ["*.localhost", "localhost"], True)
    [rule] = out["afterSet"]["rules"]
    assert rule == state["rule"]
    assert rule["action"]["requestHeaders"] == [{"header": "x-devstack-key", "operation": "set", "value": "alice"}]
    assert set(rule["condition"]["resourceTypes"]) >= REQUIRED_TYPES
    assert out["afterSet"]["store"] == {"devstack": {"key": "alice", "patterns": ["*.localhost", "localhost"]}}
    assert out["afterSet"]["badge"]["text"] == "alic"
    assert "alice" in out["afterSet"]["badge"]["title"]

    # A refused key changes nothing.
    assert out["bad"]["ok"] is False and "a-z" in out["bad"]["error"]
    assert out["afterBad"] == out["afterSet"]
    # Only the extension's own pages are answered.
    assert out["foreign"] is None

    # Hosts beyond the manifest's: the rule is set, and the state says Chrome has not granted them yet.
    staging = out["staging"]
    assert staging["rule"]["condition"]["requestDomains"] == ["staging.example.com"]
    assert staging["permitted"] is False
    assert staging["origins"] == [f"{s}://*.staging.example.com/*" for s in ("*", "ws", "wss")]

    assert out["clear"]["ok"] is True and out["clear"]["state"]["rule"] is None
    assert out["afterClear"]["rules"] == []
    assert out["afterClear"]["badge"]["text"] == ""
    assert out["afterClear"]["store"]["devstack"] == {"key": None, "patterns": ["*.staging.example.com"]}

    assert [r["action"]["requestHeaders"][0]["value"] for r in out["restored"]["rules"]] == ["carol-2"]
    assert out["restored"]["badge"]["text"] == "caro"
    assert out["state"]["key"] == "carol-2"


@needs_node
def test_every_script_parses_as_a_module_and_the_popup_offers_the_same_calls(tmp_path: Path) -> None:
    text = (EXT / "popup.js").read_text()
    for name in ("setKey:", "clearKey:", "getState:", "window.devstack = devstack"):
        assert name in text
    assert NODE is not None
    for js in sources(".js"):
        copy = tmp_path / f"{js.stem}.mjs"  # .mjs: parsed as a module by any node
        copy.write_text(js.read_text())
        done = subprocess.run(
            [NODE, "--check", str(copy)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (js.name, done.stderr)
