"""The engine contract, against the docker CLI engine and the real dockerd
(the unit tests run the same against the fake engine)."""

from __future__ import annotations

from agent.host.docker import DockerCLI

from ..engine_contract import check_engine
from .conftest import BASE_IMAGE


async def test_the_docker_cli_engine_keeps_the_contract() -> None:
    await check_engine(DockerCLI(), BASE_IMAGE)
