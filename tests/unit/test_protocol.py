from __future__ import annotations

import json

import pytest

from agent import protocol, wire
from agent.errors import RequestError
from agent.logformat import Kind, Record
from agent.ops import schemas

OPS = schemas()


def test_request_round_trip() -> None:
    req = protocol.parse_request(b'{"id": 7, "op": "run", "args": {"task": "t", "follow": true}}',
                                 OPS)
    assert (req.id, req.op, req.args) == (7, "run", {"task": "t", "follow": True})


@pytest.mark.parametrize(("line", "words"), [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"op": "rm -rf"}', "unknown op"),
    (b'{"id": 1}', "unknown op"),
    (b'{"op": "run"}', "missing argument 'task'"),
    (b'{"op": "run", "args": {"task": 5}}', "must be str"),
    (b'{"op": "show", "args": {"run": true}}', "must be int"),
    (b'{"op": "show", "args": {"run": -1}}', "out of range"),
    (b'{"op": "show", "args": {"run": 1, "x": 2}}', "unknown argument"),
    (b'{"op": "status", "args": []}', "args must be"),
    (b'{"op": "status", "extra": 1}', "unknown request field"),
    (b'{"op": "status", "id": [1]}', "id must be"),
    (b'{"op": "status", "id": "' + b"x" * 65 + b'"}', "id must be"),
])
def test_bad_requests(line: bytes, words: str) -> None:
    with pytest.raises(RequestError, match=words.replace("(", r"\(")):
        protocol.parse_request(line, OPS)


def test_splitter_handles_partial_and_many_lines() -> None:
    s = protocol.LineSplitter(max_line=10)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\nde\nf") == [b"abc", b"de"]
    assert s.feed(b"\n") == [b"f"]


def test_splitter_caps_a_line_without_newline() -> None:
    s = protocol.LineSplitter(max_line=10)
    s.feed(b"x" * 10)
    with pytest.raises(protocol.LineTooLong):
        s.feed(b"y")


def test_records_travel_as_binary_frames() -> None:
    data = bytes(range(256)) * 3 + b"\xff\xfe\r\r\n\x00\n{"
    records = [Record(24, Kind.OUTPUT, 1, 5, data), Record(24 + 20 + len(data), Kind.AGENT, 0, 6,
                                                          b"done")]
    frame = b"".join(protocol.records_event(3, records))
    line, _, blob = frame.partition(b"\n")
    message = json.loads(line)
    assert message["size"] == len(blob) == len(data) + 4 and message["next"] == records[1].end
    assert protocol.decode_records({**message, "payload": blob}) == records


def test_request_id_of_a_bad_request() -> None:
    assert protocol.request_id_of(b'{"id": 4, "op": "nope"}') == 4
    assert protocol.request_id_of(b"garbage") is None


@pytest.mark.parametrize(("line", "words"), [
    (b'{"id":' + b"1" * 5000 + b',"op":"ping"}', "longer than 20 digits"),
    (b"[" * 30000 + b"]" * 30000, "nested deeper than 32"),
    (b'{"op": "ping", "args": ' + b'{"a":' * 40 + b"1" + b"}" * 41, "nested deeper"),
    (b'{"id": NaN, "op": "ping"}', "NaN is not JSON"),
    (b'{"id": -Infinity, "op": "ping"}', "Infinity is not JSON"),
])
def test_requests_beyond_the_bounds_are_refused(line: bytes, words: str) -> None:
    with pytest.raises(RequestError, match=words):
        protocol.parse_request(line, OPS)
    assert protocol.request_id_of(line) is None


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    line = b'{"id": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"{{{{", "op": "ping"}'
    assert protocol.parse_request(line, OPS).op == "ping"


def test_a_progress_report_cannot_nest_or_overflow() -> None:
    from agent.progress import parse_report

    assert parse_report(b"[" * 2000 + b"]" * 2000) is None
    assert parse_report(b'{"progress": ' + b"9" * 4000 + b"}") is None
    assert parse_report(b'{"progress": 0.5}') == (0.5, None)


def test_frames_decode_whatever_the_pieces_they_arrive_in() -> None:
    records = [Record(24, Kind.OUTPUT, 1, 5, b"a\nb\n"), Record(56, Kind.OUTPUT, 1, 6, b"\n")]
    stream = (protocol.event(1, "streams", streams={"task": 1})
              + b"".join(protocol.records_event(1, records)) + protocol.ok(1, {"done": True}))
    for piece in (1, 7, len(stream)):
        decoder = wire.FrameDecoder()
        messages = []
        for at in range(0, len(stream), piece):
            messages += decoder.feed(stream[at:at + piece])
        assert [m.get("event", "ok") for m in messages] == ["streams", "records", "ok"]
        assert protocol.decode_records(messages[1]) == records
        assert "payload" not in messages[0] and decoder.pending == 0


def test_a_big_payload_is_received_into_its_own_buffer() -> None:
    payload = bytes(range(256)) * 1024
    stream = (protocol.event(1, "output", next=9, size=len(payload)) + payload
              + protocol.ok(1, {"next": 9}))
    decoder = wire.FrameDecoder()
    assert decoder.room() is None
    messages = decoder.feed(stream[:100])  # the line, and the payload's first bytes
    at = 100
    while (room := decoder.room()) is not None:
        count = min(len(room), 5000)
        room[:count] = stream[at:at + count]
        at += count
        messages += decoder.filled(count)
    messages += decoder.feed(stream[at:])
    assert [m.get("event", "ok") for m in messages] == ["output", "ok"]
    assert messages[0]["payload"] == payload and decoder.pending == 0


def test_output_passes_through_a_reused_buffer_to_its_sink() -> None:
    output = bytes(range(256)) * 8192  # 2 MiB: more than the buffer
    records = [Record(24, Kind.OUTPUT, 1, 5, b"kept\n")]
    stream = (protocol.event(1, "output", next=9, size=len(output)) + output
              + b"".join(protocol.records_event(1, records)) + protocol.ok(1, {"next": 9}))
    for piece in (7, 70_000, len(stream)):
        decoder = wire.FrameDecoder()
        passed = bytearray()
        decoder.on_output = passed.extend
        messages, at = [], 0
        while at < len(stream):
            room = decoder.room()
            if room is not None and len(room) > piece:  # as the client does for big ones
                count = min(len(room), piece)
                room[:count] = stream[at:at + count]
                messages += decoder.filled(count)
            else:
                count = min(piece, len(stream) - at)
                messages += decoder.feed(stream[at:at + count])
            at += count
        assert [m.get("event", "ok") for m in messages] == ["output", "records", "ok"]
        assert bytes(passed) == output and "payload" not in messages[0]
        assert protocol.decode_records(messages[1]) == records  # other frames: assembled
