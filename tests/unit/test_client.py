"""The client's connect against a real unix socket in this process."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from agent.client import Client
from agent.errors import AgentUnreachable


def full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose backlog is already full: the next connect gets EAGAIN."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return listener, fillers
        fillers.append(s)


def test_a_client_waits_while_the_backlog_is_full(tmp_path: Path) -> None:
    listener, fillers = full_listener(tmp_path / "s")
    accepted: list[socket.socket] = []

    def accept_later() -> None:
        time.sleep(0.3)
        for _ in range(len(fillers) + 1):
            accepted.append(listener.accept()[0])

    t = threading.Thread(target=accept_later)
    t.start()
    try:
        with Client(tmp_path / "s", timeout=10):
            pass
    finally:
        t.join()
        for s in [*fillers, *accepted, listener]:
            s.close()
    assert len(accepted) == len(fillers) + 1


def test_a_client_gives_up_on_a_backlog_that_stays_full(tmp_path: Path) -> None:
    listener, fillers = full_listener(tmp_path / "s")
    try:
        with pytest.raises(AgentUnreachable, match="Resource temporarily unavailable"):
            Client(tmp_path / "s", timeout=0.2)
    finally:
        for s in [*fillers, listener]:
            s.close()
