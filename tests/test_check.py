"""One validation: ``devstack check`` says exactly what a router (or controller) given the file says.

For each bad file the real commands run in subprocesses: ``devstack check FILE``, ``devstack
router --routes FILE`` and ``devstack controller --routes FILE`` must all exit non-zero with the
same one-line message naming ``file:line`` (for a host two services claim, the second claim's
line), and neither server may start serving with an empty table instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.build import BuildError
from controller.sources.file import load_route_file
from tests.cli_support import LOOPBACK_ANY, run_devstack, user_error

GOOD = """\
services:
  payments:
    hosts:
      - payments
      - payments.default.svc.cluster.local
    baseline: http://127.0.0.1:9001
    overrides:
      alice: {url: http://127.0.0.1:9101}
      bob:
        url: http://127.0.0.1:9102
        ready: false
        expires: 2030-01-01T00:00:00Z
  orders:
    hosts: [orders]
    baseline: http://127.0.0.1:9002
"""

BAD = {
    # name: (file text, line the message must name, fragment of the message)
    "yaml-syntax": (GOOD.replace("overrides:", "overrides: [", 1), 9, "invalid YAML"),
    "unknown-field": (GOOD.replace("    baseline: http://127.0.0.1:9002", "    basline: http://127.0.0.1:9002"), 15,
                      "unknown key 'basline'"),
    "bad-url": (GOOD.replace("http://127.0.0.1:9101", "https://127.0.0.1:9101"), 8, "only http://"),
    "url-with-path": (GOOD.replace("http://127.0.0.1:9002", "http://127.0.0.1:9002/api"), 15, "no path"),
    "bad-key": (GOOD.replace("alice:", "Alice:"), 8, "DNS-1123"),
    "bad-service-name": (GOOD.replace("  orders:", "  Orders:"), 13, "DNS-1123"),
    "bad-ready": (GOOD.replace("ready: false", "ready: maybe"), 11, "'ready' must be true or false"),
    "bad-expiry": (GOOD.replace("2030-01-01T00:00:00Z", "tomorrow"), 12, "ISO 8601"),
    "duplicate-key": (GOOD + "  payments:\n    baseline: http://127.0.0.1:1\n", 16, "duplicate key 'payments'"),
    "short-form-bad-url": (GOOD.replace("alice: {url: http://127.0.0.1:9101}", "alice: ftp://127.0.0.1:9101"), 8,
                           "override 'alice': upstream 'ftp://127.0.0.1:9101'"),
    "not-a-mapping": ("just some text\n", 1, "must be a mapping with a 'services' key"),
    "a-list": ("- services\n", 1, "must be a mapping with a 'services' key"),
    # Cross-service rules, which only the assembled table used to catch: the second claim's line.
    "host-claimed-twice": (GOOD.replace("hosts: [orders]", "hosts: [orders, payments.default.svc.cluster.local]"),
                           14, "host 'payments.default.svc.cluster.local' is claimed by both 'payments' (line 5)"),
    "host-is-another-service": (GOOD.replace("      - payments\n", "      - payments\n      - orders\n"), 14,
                                "host 'orders' is claimed by both 'payments' (line 5) and 'orders'"),
    "host-case-insensitive": (GOOD.replace("hosts: [orders]", "hosts: [orders, PAYMENTS]"), 14,
                              "host 'payments' is claimed by both 'payments' (line 2)"),
}  # fmt: skip


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return path


def test_the_good_file_passes_check(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    result = run_devstack("check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok, 2 services"


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_router_and_controller_refuse_a_bad_file_with_the_same_line(tmp_path: Path, case: str) -> None:
    text, line, fragment = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(BuildError) as raised:
        load_route_file(path)
    expected = f"devstack: {raised.value}"
    assert expected.startswith(f"devstack: {path}:{line}: "), expected
    assert fragment in expected

    check = run_devstack("check", str(path))
    router = run_devstack("router", "--routes", str(path), "--listen", LOOPBACK_ANY, "--admin", LOOPBACK_ANY)
    controller = run_devstack("controller", "--routes", str(path), "--listen", LOOPBACK_ANY)
    for result in (check, router, controller):
        assert result.returncode != 0, result.args
        assert user_error(result) == expected, result.args
    assert "published" not in router.stderr, "the router must not serve any table"
