"""The connection handler over in-memory streams, with a virtual clock."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from agent import control, protocol
from agent.model import Requester

ME = Requester(uid=1000, gid=1000, pid=1)
OPS: protocol.Schemas = {"ping": {}, "status": {}}


async def flood(request: protocol.Request, call: protocol.Call) -> object:
    while True:  # a follower of an endless log
        await call.event("noise", data="x" * 1000)


def test_a_client_that_stops_reading_is_dropped() -> None:
    async def main() -> None:
        server, client = trio.testing.lockstep_stream_pair()
        done = trio.Event()

        async def serve() -> None:
            await control.serve_connection(server, ME, flood, OPS)
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


async def exchange(handler: control.Handler, sent: bytes, answers: int) -> list[Any]:
    """Send ``sent`` on one connection; the first ``answers`` replies."""
    server, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.serve_connection, server, ME, handler, OPS)
        await client.send_all(sent)
        data = b""
        while data.count(b"\n") < answers:
            data += await client.receive_some()
        await client.aclose()
    return [json.loads(line) for line in data.splitlines()]


def test_requests_on_one_connection_are_answered_in_order() -> None:
    async def handler(request: protocol.Request, call: protocol.Call) -> object:
        return {"op": request.op, "uid": call.requester.uid}

    replies = trio.run(exchange, handler,
                       b'{"id": 1, "op": "ping"}\n\n{"id": 2, "op": "status"}\n', 2)
    assert replies == [{"id": 1, "ok": True, "result": {"op": "ping", "uid": 1000}},
                       {"id": 2, "ok": True, "result": {"op": "status", "uid": 1000}}]


def test_a_handler_that_breaks_answers_with_a_sentence_and_the_server_goes_on() -> None:
    async def handler(request: protocol.Request, call: protocol.Call) -> object:
        if request.op == "status":
            raise ExceptionGroup("two", [KeyError("x"), ValueError("y")])
        return "pong"

    first, second = trio.run(exchange, handler,
                             b'{"id": 1, "op": "status"}\n{"id": 2, "op": "ping"}\n', 2)
    assert first["ok"] is False and "failed unexpectedly (ExceptionGroup" in \
        first["error"]["message"] and "agent's log" in first["error"]["message"]
    assert second == {"id": 2, "ok": True, "result": "pong"}


def test_a_connection_that_breaks_outside_a_request_is_closed_alone(monkeypatch: Any) -> None:
    def broken_feed(self: Any, data: bytes) -> list[bytes]:
        raise MemoryError("no more")

    monkeypatch.setattr(protocol.LineSplitter, "feed", broken_feed)

    async def main() -> None:
        server, client = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control.serve_connection, server, ME, lambda *a: None, OPS)
            await client.send_all(b'{"id": 1, "op": "ping"}\n')
            data = b""
            while chunk := await client.receive_some():
                data += chunk
        reply = json.loads(data)
        assert reply["ok"] is False and "MemoryError" in reply["error"]["message"]

    trio.run(main)


async def test_send_nowait_sends_what_the_socket_takes_and_never_waits() -> None:
    ours, theirs = trio.socket.socketpair()
    stream = trio.SocketStream(ours)
    conn = control.Connection(stream, Requester(0, 0, 1))
    assert conn.send_nowait(b"line\n", b"payload") == len(b"line\npayload")
    assert await theirs.recv(100) == b"line\npayload"
    big = b"x" * (1 << 20)  # more than the socket buffers
    sent = conn.send_nowait(b"", big)
    assert 0 < sent < len(big)
    assert conn.send_nowait(b"more", b"") == 0  # full: nothing, at once
    while sent:
        sent -= len(await theirs.recv(1 << 20))
    async with conn._send_lock:  # a send under way goes first
        assert conn.send_nowait(b"line\n", b"") == 0
    await stream.aclose()
    assert conn.send_nowait(b"line\n", b"") == 0  # closed: its descriptor is nobody's
    theirs.close()
