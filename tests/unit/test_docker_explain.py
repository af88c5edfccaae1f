"""A docker failure told in words: dockerd gone said plainly, anything else
as the docker command and the last thing it said."""

from __future__ import annotations

from agent.errors import CommandFailed
from agent.host.docker import explain


def test_dockerd_gone_is_said_plainly() -> None:
    e = CommandFailed(["docker", "container", "inspect", "--format", "x", "c1"], 1, b"",
                      b"Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                      b"Is the docker daemon running?\n")
    said = explain(e)
    assert said.startswith("dockerd stopped answering during the run")
    assert "--format" not in said


def test_another_failure_names_the_command_and_its_last_line() -> None:
    e = CommandFailed(["docker", "create", "--name", "n", "img"], 125, b"",
                      b"Unable to find image\nError: no such image: img\x1b[31m\n")
    assert explain(e) == ("docker create failed with exit status 125: "
                          "Error: no such image: img\\x1b[31m")
