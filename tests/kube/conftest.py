"""Fixtures for the Kubernetes tests: a fake API server on loopback and a client configuration for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.kube.kube_fake_apiserver import FakeApiServer


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def kube_config(fake_api: FakeApiServer) -> Any:
    """The official client's configuration, pointed at the fake over plain HTTP."""
    configuration = k8s.Configuration(host=fake_api.url)
    return configuration
