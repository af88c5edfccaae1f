"""The connection handler over in-memory streams, with a virtual clock."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from agent import control, protocol
from agent.model import Requester

ME = Requester(uid=1000, gid=1000, pid=1)


async def flood(request: protocol.Request, requester: Requester, send: Any) -> object:
    while True:  # a follower of an endless log
        await send(protocol.event(request.id, "noise", data="x" * 1000))


def test_a_client_that_stops_reading_is_dropped() -> None:
    async def main() -> None:
        server, client = trio.testing.lockstep_stream_pair()
        done = trio.Event()

        async def serve() -> None:
            await control.serve_connection(server, ME, flood)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.send_all(b'{"id": 1, "op": "ping"}\n')
            await client.receive_some(10)  # reads a little, then nothing
            start = trio.current_time()
            with trio.fail_after(control.SEND_TIMEOUT * 2):
                await done.wait()  # the server gave up on it
            assert trio.current_time() - start >= control.SEND_TIMEOUT

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_requests_on_one_connection_are_answered_in_order() -> None:
    async def handler(request: protocol.Request, requester: Requester, send: Any) -> object:
        return {"op": request.op, "uid": requester.uid}

    async def main() -> None:
        server, client = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control.serve_connection, server, ME, handler)
            await client.send_all(b'{"id": 1, "op": "ping"}\n\n{"id": 2, "op": "status"}\n')
            data = b""
            while data.count(b"\n") < 2:
                data += await client.receive_some()
            await client.aclose()
        replies = [json.loads(line) for line in data.splitlines()]
        assert replies == [{"id": 1, "ok": True, "result": {"op": "ping", "uid": 1000}},
                           {"id": 2, "ok": True, "result": {"op": "status", "uid": 1000}}]

    trio.run(main)
