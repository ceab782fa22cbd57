"""What users get wrong gets one line naming the flag and the reason, never a traceback.

Each case runs the real command in a subprocess: a port already in use (for every listener flag
of every command), an unknown ``--log-level``, ``--trace`` with an OTLP exporter that is not
installed, a route file that cannot be read. Also: ``--version``, every flag's help stating its
default, and the access log flags reaching ``RouterSettings``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import pytest

from devstack.cli import build_parser, settings_from_args
from tests.cli_support import LOOPBACK_ANY, ROOT, occupied_port, run_devstack, user_error

ROUTES = str(ROOT / "examples" / "routes.yaml")


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["router", "--routes", ROUTES], "--listen"),
        (["router", "--routes", ROUTES], "--admin"),
        (["controller", "--routes", ROUTES], "--listen"),
        (["demo"], "--listen"),
        (["demo"], "--admin"),
    ],
    ids=["router-listen", "router-admin", "controller-listen", "demo-listen", "demo-admin"],
)
def test_a_port_in_use_names_the_flag_and_address(command: list[str], flag: str) -> None:
    others = {"--listen": LOOPBACK_ANY, "--admin": LOOPBACK_ANY} if command[0] != "controller" else {}
    with occupied_port() as port:
        address = f"127.0.0.1:{port}"
        flags = {**others, flag: address}
        result = run_devstack(*command, *(item for pair in flags.items() for item in pair))
    assert result.returncode != 0
    assert user_error(result) == f"devstack: {flag} {address}: address already in use"


def test_an_access_log_that_cannot_be_opened_names_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "access.log"
    result = run_devstack(
        "router", "--routes", ROUTES, "--listen", LOOPBACK_ANY, "--admin", LOOPBACK_ANY, "--access-log", str(path)
    )
    assert result.returncode != 0
    assert user_error(result) == f"devstack: --access-log {path}: no such file or directory"


def test_an_unknown_log_level_is_one_line_naming_the_choices() -> None:
    result = run_devstack("router", "--routes", ROUTES, "--log-level", "loud")
    assert result.returncode == 2
    line = user_error(result)
    assert line.startswith("devstack router: argument --log-level: invalid choice: 'LOUD'"), line
    assert all(level in line for level in ("DEBUG", "INFO", "WARNING", "ERROR"))


@pytest.mark.parametrize("given", ["debug", "Warning", "ERROR"])
def test_log_levels_are_accepted_in_any_case(given: str) -> None:
    args = build_parser().parse_args(["controller", "--routes", ROUTES, "--log-level", given])
    assert args.log_level == given.upper()


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.exporter") is not None, reason="an OTLP exporter is installed here"
)
def test_trace_with_an_otlp_exporter_not_installed_names_the_extra() -> None:
    result = run_devstack(
        "router", "--routes", ROUTES, "--listen", LOOPBACK_ANY, "--admin", LOOPBACK_ANY, "--trace",
        env={"OTEL_TRACES_EXPORTER": "otlp"},
    )  # fmt: skip
    assert result.returncode != 0
    line = user_error(result)
    assert line.startswith("devstack: --trace: OTEL_TRACES_EXPORTER names 'otlp'"), line
    assert line.endswith("pip install 'devstack-router[otlp]'"), line


def _unreadable(tmp_path: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / "routes.yaml"
    if kind == "missing":
        return path, "no such file or directory"
    if kind == "directory":
        path.mkdir()
        return path, "is a directory"
    if kind == "not-utf8":
        latin1 = b"services:\n  caf\xe9: {baseline: http://127.0.0.1:1}\n"
        path.write_bytes(latin1)
        return path, f"not UTF-8 (byte {latin1.index(0xE9)})"
    path.write_text("services: {}\n")
    path.chmod(0)
    return path, "permission denied"


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8", "no-permission"])
@pytest.mark.parametrize("command", ["check", "router", "controller"])
def test_a_route_file_that_cannot_be_read_is_one_line_naming_file_and_reason(
    tmp_path: Path, kind: str, command: str
) -> None:
    if kind == "no-permission" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    path, reason = _unreadable(tmp_path, kind)
    listeners = {
        "check": [],
        "router": ["--listen", LOOPBACK_ANY, "--admin", LOOPBACK_ANY],
        "controller": ["--listen", LOOPBACK_ANY],
    }[command]
    args = [str(path)] if command == "check" else ["--routes", str(path), *listeners]
    result = run_devstack(command, *args)
    assert result.returncode != 0
    assert user_error(result) == f"devstack: {path}: cannot read route file: {reason}"


def test_version_prints_the_installed_version() -> None:
    expected = "unknown"
    for name in ("devstack-router", "devstack"):
        try:
            expected = importlib.metadata.version(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    result = run_devstack("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"devstack {expected}"


def _parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def _rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as ``--help`` prints it for ``action``, defaults filled in."""
    formatter = parser._get_formatter()
    return formatter._expand_help(action)  # type: ignore[attr-defined,no-any-return]


def test_every_flag_has_help_that_states_its_default() -> None:
    checked = 0
    for prog, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            text = _rendered_help(parser, action) if action.help else ""
            assert text.strip(), f"{prog} {name} has no help"
            default = action.default
            if default is None or default is argparse.SUPPRESS or default == []:
                continue
            shown = "off" if default is False else str(default)
            assert f"default: {shown}" in text, f"{prog} {name}: help does not state its default {shown!r}: {text!r}"
            checked += 1
    assert checked >= 30  # the router's timeouts and limits are among them


def test_help_is_printed_with_defaults() -> None:
    result = run_devstack("router", "--help")
    assert result.returncode == 0, result.stderr
    assert "(default: 127.0.0.1:8080)" in result.stdout
    assert "(default: stdout)" in result.stdout


@pytest.mark.parametrize(
    ("given", "destination"),
    [
        ([], "-"),
        (["--access-log", "stdout"], "-"),
        (["--access-log", "off"], None),
        (["--access-log", "a.log"], "a.log"),
    ],
)
def test_access_log_flag_maps_to_settings(given: list[str], destination: str | None) -> None:
    args = build_parser().parse_args(["router", "--routes", ROUTES, *given])
    settings = settings_from_args(args)
    assert settings.access_log == destination
    assert settings.access_log_format == "json"


def test_access_log_format_flag() -> None:
    args = build_parser().parse_args(["router", "--routes", ROUTES, "--access-log-format", "text"])
    assert settings_from_args(args).access_log_format == "text"
    result = run_devstack("router", "--routes", ROUTES, "--access-log-format", "xml")
    assert result.returncode == 2
    assert "argument --access-log-format: invalid choice: 'xml'" in user_error(result)


@pytest.mark.parametrize("command", [["router", "--kubernetes"], ["controller", "--kubernetes"]])
def test_kubernetes_without_the_client_names_the_extra(tmp_path: Path, command: list[str]) -> None:
    # A package that fails to import exactly as an absent one does, first on the path.
    shadow = tmp_path / "kubernetes"
    shadow.mkdir()
    absent = "raise ModuleNotFoundError(\"No module named 'kubernetes'\", name='kubernetes')\n"
    (shadow / "__init__.py").write_text(absent)
    result = run_devstack(
        *command, "--listen", LOOPBACK_ANY, *(["--admin", LOOPBACK_ANY] if command[0] == "router" else []),
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )  # fmt: skip
    assert result.returncode != 0
    assert user_error(result) == (
        "devstack: --kubernetes needs the Kubernetes client (kubernetes): pip install 'devstack-router[kubernetes]'"
    )
