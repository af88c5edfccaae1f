"""The client side of ``efci shell``: the user's terminal, relayed.

The terminal is put in raw mode (restored on the way out, whatever happens);
keys go to the agent as ``{"input": ...}`` lines and window changes as
``{"resize": ...}``; the shell's output comes back in binary frames.
"""

from __future__ import annotations

import base64
import os
import selectors
import signal
import socket
import sys
import termios
import tty
from typing import Any

from . import wire
from .client import RemoteError
from .errors import AgentUnreachable, EfciError


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(wire.encode(message))


def run_shell(socket_path: str, run: int, stage: str | None = None,
              discard: bool = False) -> int:
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    if not os.isatty(stdin):
        raise EfciError("efci shell needs a terminal on its standard input")
    cols, rows = os.get_terminal_size(stdin)
    cols, rows = cols or 80, rows or 24  # a terminal that never had a size
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
    except OSError as e:
        raise AgentUnreachable(f"cannot reach the agent at {socket_path}: {e.strerror}") from None
    args = {"run": run, "cols": cols, "rows": rows, "discard": discard}
    _send(sock, {"id": 1, "op": "shell", "args": args | ({"stage": stage} if stage else {})})
    resized = [False]
    signal.signal(signal.SIGWINCH, lambda *_: resized.__setitem__(0, True))
    saved = termios.tcgetattr(stdin)
    frames = wire.FrameDecoder()
    try:
        tty.setraw(stdin)
        selector = selectors.DefaultSelector()
        selector.register(stdin, selectors.EVENT_READ)
        selector.register(sock, selectors.EVENT_READ)
        while True:
            if resized[0]:
                resized[0] = False
                _send(sock, {"resize": list(os.get_terminal_size(stdin))})
            try:
                ready = selector.select()
            except InterruptedError:
                continue
            for key, _ in ready:
                if key.fileobj == stdin:
                    data = os.read(stdin, 4096)
                    if not data:
                        sock.shutdown(socket.SHUT_WR)
                        selector.unregister(stdin)
                        continue
                    _send(sock, {"input": base64.b64encode(data).decode()})
                    continue
                data = sock.recv(65536)
                if not data:
                    raise AgentUnreachable("the agent closed the connection")
                for message in frames.feed(data):
                    if message.get("event") == "output":
                        os.write(stdout, message["payload"])
                    elif message.get("event") == "attached" and message.get("note"):
                        os.write(sys.stderr.fileno(), f"{message['note']}\r\n".encode())
                    elif "ok" in message:
                        if not message["ok"]:
                            raise RemoteError(message["error"])
                        return int(message["result"].get("exit_code") or 0)
    finally:
        termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, signal.SIG_DFL)
        sock.close()
