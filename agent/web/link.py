"""The page's side of the control socket: one connection per request,
under Trio (hypercorn's trio worker runs the page in Trio)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .. import wire
from ..client import RemoteError
from ..errors import AgentUnreachable

_ids = itertools.count(1)


class Exchange:
    """One request's messages as they come: events, then the final one."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._frames = wire.FrameDecoder()
        self._messages: list[dict[str, Any]] = []

    async def send(self, op: str, args: dict[str, Any]) -> None:
        await self._stream.send_all(wire.encode({"id": next(_ids), "op": op, "args": args}))

    async def next(self) -> dict[str, Any]:
        """The next message; a final error raises RemoteError."""
        while not self._messages:
            data = await self._stream.receive_some(1 << 20)
            if not data:
                raise AgentUnreachable("the agent closed the connection")
            self._messages = self._frames.feed(data)
        message = self._messages.pop(0)
        if "event" not in message and not message.get("ok"):
            raise RemoteError(message.get("error") or {})
        return message


class AgentLink:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    @asynccontextmanager
    async def open(self, op: str, **args: Any) -> AsyncIterator[Exchange]:
        try:
            stream = await trio.open_unix_socket(str(self.socket_path))
        except OSError as e:
            raise AgentUnreachable(f"cannot reach the agent at {self.socket_path}: "
                                   f"{e.strerror}") from None
        async with stream:
            exchange = Exchange(stream)
            await exchange.send(op, {k: v for k, v in args.items() if v is not None})
            yield exchange

    async def call(self, op: str, **args: Any) -> Any:
        """One operation's result (its events, if any, dropped)."""
        async with self.open(op, **args) as exchange:
            while "event" in (message := await exchange.next()):
                pass
            return message.get("result")
