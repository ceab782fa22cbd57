"""The routing-key API, and the package's import promises (light, independent of router/controller)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest
from opentelemetry import baggage
from opentelemetry.context import Context, get_current

import propagation
from propagation import current_routing_key, inject, with_routing_key


@pytest.mark.parametrize("key", ["alice", "a", "bob-2", "0", "a" * 63])
def test_a_dns_label_is_a_routing_key(key: str) -> None:
    assert current_routing_key(baggage.set_baggage("devstack", key, Context())) == key


@pytest.mark.parametrize(
    "value", ["", "Alice", "-alice", "alice-", "a" * 64, "al ice", "alice;ttl=5", "al_ice", "é", 7]
)
def test_anything_else_is_no_routing_key(value: object) -> None:
    assert current_routing_key(baggage.set_baggage("devstack", value, Context())) is None


def test_no_baggage_is_no_routing_key() -> None:
    assert current_routing_key(Context()) is None


def test_only_the_exact_member_name_carries_the_key() -> None:
    context = baggage.set_baggage("devstack2", "alice", baggage.set_baggage("xdevstack", "alice", Context()))
    assert current_routing_key(context) is None


def test_another_member_name_can_be_asked_for() -> None:
    context = baggage.set_baggage("sd-routing-key", "alice", Context())
    assert current_routing_key(context, member="sd-routing-key") == "alice"


def test_with_routing_key_sets_the_key_for_the_block_only() -> None:
    before = get_current()
    with with_routing_key("alice") as context:
        assert current_routing_key() == "alice"
        assert current_routing_key(context) == "alice"
        assert inject({})["baggage"] == "devstack=alice"
        with with_routing_key("bob"):
            assert current_routing_key() == "bob"
        assert current_routing_key() == "alice"
    assert get_current() == before


def test_with_routing_key_keeps_the_rest_of_the_baggage() -> None:
    with with_routing_key("alice", member="tenant"), with_routing_key("bob"):
        assert inject({})["baggage"] == "devstack=bob,tenant=alice"


def test_with_routing_key_restores_the_context_when_the_block_raises() -> None:
    before = get_current()
    with pytest.raises(RuntimeError), with_routing_key("alice"):
        raise RuntimeError("handler failed")
    assert get_current() == before


@pytest.mark.parametrize("key", ["Alice", "", "alice;ttl=5", "a" * 64])
def test_with_routing_key_refuses_a_key_that_would_route_nowhere(key: str) -> None:
    with pytest.raises(ValueError, match="DNS-1123"):
        with_routing_key(key).__enter__()


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={k: v for k, v in os.environ.items() if k != "OTEL_PROPAGATORS"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_the_package_does_not_import_a_web_framework() -> None:
    out = run_python(
        """
        import sys, propagation
        print("aiohttp" in sys.modules)
        print(callable(propagation.aiohttp.middleware), "aiohttp" in sys.modules)
        """
    )
    assert out.splitlines() == ["False", "True True"]


def test_the_package_never_imports_router_or_controller() -> None:
    out = run_python(
        """
        import sys, propagation, propagation.aiohttp, propagation.asgi, propagation.wsgi
        print(sorted(m for m in sys.modules if m.split(".")[0] in {"router", "controller"}))
        """
    )
    assert out == "[]"


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = propagation.flask  # type: ignore[attr-defined]


def test_every_module_opens_with_a_docstring() -> None:
    names = ["propagation", *(f"propagation.{m.name}" for m in pkgutil.iter_modules(propagation.__path__))]
    assert {"propagation.aiohttp", "propagation.asgi", "propagation.wsgi"} <= set(names)
    for name in names:
        doc = importlib.import_module(name).__doc__
        assert doc is not None and doc.strip(), name
