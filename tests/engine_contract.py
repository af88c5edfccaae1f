"""The Engine contract, as tests any engine must pass: run against the fake
engine by the unit tests and against the docker CLI engine by the
integration tests (trio's habit of one conformance suite for every
implementation of an interface).

``engine`` is fresh for the suite; ``image`` is an image it has with a
POSIX shell; the fake engine is told these commands' programs (see
CONTRACT_PROGRAMS), the real one runs them.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import trio

from agent.host.engine import ContainerSpec, Engine, OneShot

PRINT_AND_EXIT = ("sh", "-c", "printf 'hi there'; exit 3")
SAY_AND_FAIL = ("sh", "-c", "echo said; exit 2")
SLEEP = ("sleep", "600")
PRINT_PAUSE_PRINT = ("sh", "-c",
                     "printf '\\377\\376\\000 before, '; sleep 2; printf after; exit 4")


async def check_engine(engine: Engine, image: str) -> None:
    """Every check of the contract, in one go (each makes its own names)."""
    await destroys_are_idempotent(engine)
    await a_container_runs_attached_and_keeps_its_exit_status(engine, image)
    await one_command_creates_and_starts_a_container(engine, image)
    await a_container_runs_the_image_its_tag_names_by_id(engine, image)
    await a_running_container_stops(engine, image)
    await one_shot_containers_leave_nothing(engine, image)
    await a_container_keeps_its_output_for_a_later_reader(engine, image)
    await volumes_come_and_go_by_label(engine)


def _name(what: str) -> str:
    return f"efci-contract-{what}-{secrets.token_hex(4)}"


async def destroys_are_idempotent(engine: Engine) -> None:
    missing = _name("missing")
    assert await engine.inspect(missing) is None
    await engine.stop(missing, grace=1)
    await engine.remove(missing)
    await engine.remove_image(f"efci-contract/missing:{secrets.token_hex(4)}")
    await engine.remove_volumes([_name("missing")])


async def a_container_runs_attached_and_keeps_its_exit_status(engine: Engine,
                                                              image: str) -> None:
    name = _name("print")
    container = await engine.create(ContainerSpec(name=name, image=image,
                                                  command=PRINT_AND_EXIT, network="none",
                                                  tty=True, labels={"contract": "1"}))
    try:
        state = await engine.inspect(container)
        assert state is not None and state.status == "created"
        output = b""
        async with engine.attach(container, cols=80, rows=24) as terminal:
            while data := await terminal.receive_some():
                output += data
            await terminal.wait()
        assert output == b"hi there"
        state = await engine.inspect(name)  # by name as well as by id
        assert state is not None and (state.status, state.exit_code) == ("exited", 3)
        assert not state.oom_killed
    finally:
        await engine.remove(name)
    assert await engine.inspect(name) is None


async def one_command_creates_and_starts_a_container(engine: Engine, image: str) -> None:
    """run_container: the output and exit status, the id once created, the
    container kept after; an image that does not exist makes none."""
    name = _name("run")
    try:
        output = b""
        spec = ContainerSpec(name=name, image=image, command=PRINT_AND_EXIT, network="none",
                             tty=True, labels={"contract": "1"})
        async with engine.run_container(spec, cols=80, rows=24) as started:
            while data := await started.receive_some():
                output += data
            status = await started.wait()
            container = await started.created()
        assert (output, status) == (b"hi there", 3)
        assert container is not None and started.created_at is not None
        state = await engine.inspect(container)
        assert state is not None and (state.status, state.exit_code) == ("exited", 3)
    finally:
        await engine.remove(name)
    missing = _name("missing")
    # On a registry nobody serves (docker tries to pull what is missing): refused at once.
    spec = ContainerSpec(name=missing, image=f"localhost:1/efci-contract:{secrets.token_hex(4)}",
                         command=PRINT_AND_EXIT, network="none", tty=True)
    async with engine.run_container(spec, cols=80, rows=24) as started:
        while await started.receive_some():
            pass
        assert await started.wait() != 0
        assert await started.created() is None
    assert await engine.inspect(missing) is None


async def a_container_runs_the_image_its_tag_names_by_id(engine: Engine, image: str) -> None:
    """image_id: what the tag names now (as a container made from the tag
    records it), a container runs by it; a missing tag has none."""
    assert await engine.image_id(f"efci-contract/missing:{secrets.token_hex(4)}") is None
    image_id = await engine.image_id(image)
    assert image_id is not None and image_id.startswith("sha256:")
    by_tag, by_id = _name("by-tag"), _name("by-id")
    try:
        await engine.create(ContainerSpec(name=by_tag, image=image, command=("true",),
                                          network="none"))
        tagged = await engine.inspect(by_tag)
        assert tagged is not None and tagged.image_id == image_id
        spec = ContainerSpec(name=by_id, image=image_id, command=("true",), network="none",
                             tty=True, labels={"contract": "1"})
        async with engine.run_container(spec, cols=80, rows=24) as started:
            while await started.receive_some():
                pass
            assert await started.wait() == 0
        state = await engine.inspect(by_id)
        assert state is not None and (state.image_id, state.exit_code) == (image_id, 0)
    finally:
        await engine.remove(by_tag)
        await engine.remove(by_id)


async def a_running_container_stops(engine: Engine, image: str) -> None:
    name = _name("sleep")
    container = await engine.create(ContainerSpec(name=name, image=image, command=SLEEP,
                                                  network="none", tty=True))
    try:
        async with trio.open_nursery() as nursery:
            async def attached() -> None:
                async with engine.attach(container, cols=80, rows=24) as terminal:
                    while await terminal.receive_some():
                        pass

            nursery.start_soon(attached)
            await _until_running(engine, container)
            await engine.stop(container, grace=1)
            state = await engine.inspect(container)
            assert state is not None and state.status == "exited" and state.exit_code != 0
            await engine.stop(container, grace=1)  # again: nothing to do
    finally:
        await engine.remove(name)


async def a_container_keeps_its_output_for_a_later_reader(engine: Engine, image: str) -> None:
    """With log_keep, what a TTY container printed can be read again from
    its last start on, byte for byte, by a reader that comes later (an agent
    that restarted: tests/integration/test_reliability.py has that story)."""
    name = _name("kept")
    await engine.create(ContainerSpec(name=name, image=image, command=PRINT_PAUSE_PRINT,
                                      network="none", tty=True, log_keep=1 << 20))
    try:
        attached = b""
        async with engine.attach(name, cols=80, rows=24) as terminal:
            while data := await terminal.receive_some():
                attached += data
        state = await engine.inspect(name)
        assert state is not None and state.keeps_output
        assert (state.status, state.exit_code) == ("exited", 4)
        kept = b""
        async with engine.kept_output(name, state.started_at) as output:
            while data := await output.receive_some(65536):
                kept += data
        assert kept == attached == b"\xff\xfe\x00 before, after", (kept, attached)
    finally:
        await engine.remove(name)


async def _until_running(engine: Engine, container: str) -> None:
    for _ in range(600):  # another program's state: polled, for a minute at most
        state = await engine.inspect(container)
        if state is not None and state.status == "running":
            return
        await trio.sleep(0.1)
    raise AssertionError(f"{container} never ran")


async def one_shot_containers_leave_nothing(engine: Engine, image: str) -> None:
    status, output = await engine.run(OneShot(name=_name("run"), image=image,
                                              args=SAY_AND_FAIL, network="none"))
    assert (status, output.strip()) == (2, b"said")
    name = _name("attached")
    async with engine.run_attached(OneShot(name=name, image=image, args=PRINT_AND_EXIT,
                                           network="none"), cols=80, rows=24) as terminal:
        output = b""
        while data := await terminal.receive_some():
            output += data
        assert (output, await terminal.wait()) == (b"hi there", 3)
    assert await engine.inspect(name) is None
    cut_short = _name("cut")
    with trio.move_on_after(2):
        async with engine.run_attached(OneShot(name=cut_short, image=image, args=SLEEP,
                                               network="none"), cols=80, rows=24) as terminal:
            await terminal.receive_some()
    assert await engine.inspect(cut_short) is None  # removed although cancelled


async def volumes_come_and_go_by_label(engine: Engine) -> None:
    label = secrets.token_hex(4)
    name = _name("volume")
    assert not await engine.volume_exists(name)
    await engine.create_volume(name, {"org.efforting-ci.contract": label})
    assert await engine.volume_exists(name)
    assert Path(await engine.volume_path(name)).is_dir()
    await engine.create_volume(name, {"org.efforting-ci.contract": "other"})  # kept as it is
    assert name in await engine.labelled("volume", {"contract": label}, "contract")
    await engine.remove_volumes([name])
    assert not await engine.volume_exists(name)
