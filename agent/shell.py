"""``efci shell RUN``: an interactive shell in a finished run's environment.

The run's container (in a pipeline, the container of the stage named with
``--stage``, over the layers the stages before it left) is committed to an
image (its filesystem as the task left it), and a shell container is
started from that image with the same worktree views (the run's overlay
upper layers, mounted again), the same secrets, and the same network
policy; deploy targets are mounted read-only, so debugging cannot publish
by accident.

What the person changes is kept for the run's next attempt (the seed's
"exec into a stopped container, patch something, restart"): on leaving, the
shell's container is committed to ``efci-patched/<instance>:<run>`` (with
``-<stage>`` for a stage), and ``efci restart`` creates the run's (or the
stage's) container again from that image, with the task's own command,
environment and mounts.  Changes under /src are in the run's upper layers
either way.  ``--discard`` opens a shell whose changes outside /src are
thrown away.  The administrator's terminal is relayed over the control
socket:

* agent -> client: ``{"event": "output", "size": N}`` and N raw bytes;
* client -> agent: ``{"input": "<base64>"}`` and ``{"resize": [cols, rows]}``
  lines, until the client closes its side or the shell exits.

Everything made for the session (container, image, mounts) is removed
when it ends.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import trio

from . import protocol
from .access import host_mounts
from .environment import shielded
from .errors import Conflict, RequestError
from .host.engine import Terminal
from .runs import (
    container_spec,
    patched_image,
    stage_container_name,
    task_container_name,
    task_from_wire,
)

if TYPE_CHECKING:
    from .runs import Runs

log = logging.getLogger(__name__)

SHELL = "/bin/sh"


async def serve_shell(runs: Runs, call: protocol.Call, run_id: int, cols: int, rows: int,
                      stage: str | None = None, discard: bool = False) -> dict[str, Any]:
    if not (10 <= cols <= 1000 and 5 <= rows <= 1000):
        raise RequestError(f"terminal size {cols}x{rows} is out of range")
    engine = runs.engine
    async with runs.claimed(run_id) as record, AsyncExitStack() as cleanup:
        if record.container_id is None or record.removed_at is not None:
            raise Conflict(f"run {run_id} has no container to open a shell in")
        task = task_from_wire(await runs.state.call(runs.state.run_declaration, run_id))
        index = await runs.stage_with_container(run_id, task, stage, "to open a shell in")
        container = task_container_name(runs.instance, run_id)
        if stage is not None and index is not None:
            task = task.stage_task(task.stages[index])
            container = stage_container_name(runs.instance, run_id, stage)
        where = f"run {run_id}" + (f", stage {stage}" if stage else "")
        image = f"efci-shell/{runs.instance}:{run_id}"
        name = f"efci-{runs.instance}-{run_id}-shell"
        # Undone in reverse, each step on its own: the image, the container.
        cleanup.push_async_callback(shielded(f"removing {image}", engine.remove_image, image))
        await engine.commit(container, image)
        env = await cleanup.enter_async_context(runs.environment_of(run_id, index or 0))
        cleanup.push_async_callback(shielded(f"removing {name}", engine.remove, name))
        mounts = [dataclasses.replace(m, readonly=True) for m in host_mounts(runs.cfg, task)]
        spec = dataclasses.replace(
            container_spec(runs.cfg, runs.instance, run_id, task, env.views, mounts),
            name=name, image=image, command=None, entrypoint=SHELL, interactive=True,
            log_keep=None)
        await engine.remove(name)  # one left by a killed agent
        await engine.create(spec)
        log.info("shell in %s opened by uid %d", where, call.requester.uid)
        restart = f"efci restart {run_id}" + (f" --stage {stage}" if stage else "")
        note = (f"efci: a shell in {where}; what you change here outside /src is thrown "
                "away when you leave" if discard else
                f"efci: a shell in {where}; what you change here is what `{restart}` runs "
                "with (open it with --discard to throw changes away)")
        await call.event("attached", run=run_id, note=note)
        async with engine.attach(name, cols=cols, rows=rows, interactive=True) as terminal:
            exit_status = await _relay(terminal, call)
        kept = not discard
        if kept:
            with trio.CancelScope(shield=True):
                await engine.commit(name, patched_image(runs.instance, run_id, stage))
                if index is None:
                    await runs.state.call(runs.state.update_run, run_id,
                                          patched_attempt=record.attempts + 1)
                else:
                    await runs.state.call(runs.state.update_stage, run_id, index,
                                          patched_attempt=record.attempts + 1)
    log.info("shell in %s closed (exit status %s)%s", where, exit_status,
             "; its changes are kept for the next attempt" if kept else "")
    return {"run": run_id, "exit_code": exit_status, "kept": kept}


async def _relay(proc: Terminal, call: protocol.Call) -> int | None:
    async with trio.open_nursery() as nursery:

        async def output() -> None:
            while data := await proc.receive_some():
                await call.send(protocol.event(call.id, "output", size=len(data)) + data)
            nursery.cancel_scope.cancel()  # the shell exited

        async def user_input() -> None:
            while (line := await call.receive_line()) is not None:
                try:
                    message = protocol.loads(line)
                    if "input" in message:
                        await proc.send_all(base64.b64decode(message["input"], validate=True))
                    elif "resize" in message:
                        cols, rows = (int(v) for v in message["resize"])
                        if 10 <= cols <= 1000 and 5 <= rows <= 1000:
                            proc.resize(cols, rows)
                except (ValueError, TypeError, KeyError, binascii.Error):
                    continue  # a malformed frame is dropped, the session goes on
            nursery.cancel_scope.cancel()  # the client went away

        nursery.start_soon(output)
        nursery.start_soon(user_input)
    with trio.move_on_after(10):
        return await proc.wait()
    return None
