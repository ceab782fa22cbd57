"""The compiled hot path: the suite runs the mode it claims, and a stale build never runs.

``make test`` runs the whole suite with ``DEVSTACK_EXPECT_COMPILED=1`` (mypyc extensions) and
the router's tests again with ``DEVSTACK_INTERPRETED=1`` (pure Python); these tests make both
claims checkable, and prove the guard in ``router/__init__.py`` against an edited source.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

import router
import router.http
import router.proxy
import router.request
import router.upstream

from .support import make_table, running_router

ROUTER_DIR = Path(router.__file__).resolve().parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
built = pytest.mark.skipif(not (ROUTER_DIR / "_compiled.json").exists(), reason="no compiled build here (make compile)")


def test_the_suite_runs_the_mode_it_was_asked_for() -> None:
    if os.environ.get("DEVSTACK_EXPECT_COMPILED") == "1":
        assert router.COMPILED, f"expected the compiled hot path, got: {router.HOT_PATH_MODE}"
        assert router.proxy.__file__.endswith(SUFFIX)
        assert router.upstream.__file__.endswith(SUFFIX)
        from router import _speedups  # built with the compiled hot path

        assert router.upstream._scan_response_head is _speedups.scan_response_head
        assert router.request._join is _speedups.join_bytes
        from router import nghttp2

        assert nghttp2.NATIVE or not nghttp2.AVAILABLE, "the nghttp2 engine's C callbacks (router._ngrecord) unused"
    elif os.environ.get("DEVSTACK_INTERPRETED") == "1":
        assert not router.COMPILED
        assert router.HOT_PATH_MODE in {"DEVSTACK_INTERPRETED=1", "not compiled"}
        assert router.proxy.__file__.endswith(".py")
        assert router.upstream._scan_response_head is router.http.scan_response_head
        assert router.request._join == b"".join
        from router import nghttp2

        assert not nghttp2.NATIVE
    else:
        assert router.proxy.__file__.endswith(SUFFIX if router.COMPILED else ".py")


def test_setup_py_and_the_makefile_take_the_compiled_modules_from_router_native() -> None:
    root = ROUTER_DIR.parent
    setup_py = (root / "setup.py").read_text()
    assert "native.HOT_PATH_MODULES" in setup_py and "native.NATIVE_HELPERS" in setup_py
    assert '"proxy"' not in setup_py, "setup.py keeps a module list of its own again"
    assert "router/_native.py sources" in (root / "Makefile").read_text()
    listed = subprocess.run(
        [sys.executable, "router/_native.py", "sources"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    expected = [f"router/{name}.py" for name in router.HOT_PATH_MODULES]
    assert listed == expected + [f"router/{name}.c" for name in router.NATIVE_HELPERS]
    assert all((root / path).exists() for path in listed)


def _import_in_copy(tmp_path: Path, edit: str | None, env: dict[str, str] | None = None) -> dict[str, object]:
    """Import a copy of the built package in a fresh interpreter; what it ran and warned."""
    copy = tmp_path / "router"
    shutil.copytree(ROUTER_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        source = copy / edit
        comment = "/* an edit after the build */" if edit.endswith(".c") else "# an edit after the build"
        source.write_text(source.read_text() + f"\n{comment}\n")
    probe = (
        "import json, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import router, router.http, router.proxy, router.stats, router.upstream\n"
        "print(json.dumps({'compiled': router.COMPILED, 'mode': router.HOT_PATH_MODE,\n"
        "    'proxy': router.proxy.__file__, 'stats': router.stats.__file__,\n"
        "    'c_scan': router.upstream._scan_response_head is not router.http.scan_response_head,\n"
        "    'warnings': [str(w.message) for w in caught]}))\n"
    )
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("DEVSTACK_")}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**clean_env, "PYTHONPATH": str(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


@built
def test_an_untouched_build_runs_compiled(tmp_path: Path) -> None:
    got = _import_in_copy(tmp_path, edit=None)
    assert got["compiled"] is True and got["mode"] == "compiled"
    assert str(got["proxy"]).endswith(SUFFIX) and str(got["stats"]).endswith(SUFFIX)
    assert got["c_scan"] is True
    assert got["warnings"] == []


@built
def test_a_source_edited_after_the_build_runs_interpreted_with_a_warning(tmp_path: Path) -> None:
    got = _import_in_copy(tmp_path, edit="stats.py")
    assert got["compiled"] is False and got["mode"] == "stale build"
    # All hot-path modules switch together, not just the edited one.
    assert str(got["proxy"]).endswith("proxy.py") and str(got["stats"]).endswith("stats.py")
    warnings = got["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1
    assert "stats.py changed since the build" in warnings[0] and "make compile" in warnings[0]


@built
def test_an_edited_c_helper_is_left_unused_with_the_rest_of_the_build(tmp_path: Path) -> None:
    got = _import_in_copy(tmp_path, edit="_speedups.c")
    assert got["compiled"] is False and got["mode"] == "stale build" and got["c_scan"] is False
    assert str(got["proxy"]).endswith("proxy.py")
    warnings = got["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1
    assert "_speedups.c changed since the build" in warnings[0]


@built
def test_interpreted_can_be_forced(tmp_path: Path) -> None:
    got = _import_in_copy(tmp_path, edit=None, env={"DEVSTACK_INTERPRETED": "1"})
    assert got["compiled"] is False and str(got["proxy"]).endswith("proxy.py") and got["warnings"] == []
    assert got["c_scan"] is False


async def test_health_reports_the_hot_path_mode() -> None:
    table = make_table({"svc": {"baseline": "http://127.0.0.1:9"}})
    async with running_router(table, admin=True) as server:
        host, port = server.admin_address
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{port}/healthz") as resp:
                body = await resp.json()
    assert body == {"status": "ok", "hot_path": router.HOT_PATH_MODE}
