"""Fixtures for the CLI tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cli_helpers import GatewayProcess, Recorder, example_config, serve_recorder


@pytest.fixture(scope="module")
def example_target() -> Iterator[tuple[Recorder, str]]:
    """The example's outbound target, served by the tests on a free port."""
    recorder, server = serve_recorder()
    yield recorder, server.url
    server.stop()


@pytest.fixture(scope="module")
def example_gateway(
    tmp_path_factory: pytest.TempPathFactory, example_target: tuple[Recorder, str]
) -> Iterator[GatewayProcess]:
    """The README's gateway: examples/gateway.toml, no store configured, fresh directory.

    Its target is pointed at ``example_target``: the tests reach only servers they start.
    """
    cwd = tmp_path_factory.mktemp("fresh-machine")
    config = example_config(cwd, example_target[1] + "/events")
    gateway = GatewayProcess(config, cwd, env={"CONVERGE_OUTBOUND_TOKEN": "t" * 32})
    yield gateway
    gateway.stop()
