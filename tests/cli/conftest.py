"""Fixtures for the CLI tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cli_helpers import EXAMPLE, GatewayProcess


@pytest.fixture(scope="module")
def example_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The README's gateway: examples/gateway.toml, no store configured, fresh directory."""
    cwd = tmp_path_factory.mktemp("fresh-machine")
    gateway = GatewayProcess(EXAMPLE, cwd, env={"CONVERGE_OUTBOUND_TOKEN": "t" * 32})
    yield gateway
    gateway.stop()
