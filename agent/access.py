"""What of the host a task container may see besides its worktrees: the
secrets it declares and the deploy targets agent.yml allows it.

Checked before anything runs; a refusal is the run's result (failed), with
a message that says what to change.

* A secret NAME is ``<secrets_base>/tasks/<owner>/NAME`` (a file or a
  directory the administrator puts there), mounted read-only at
  ``/run/secrets/NAME``.  Nothing else of the secrets store is visible.
* A deploy target is named in agent.yml's ``deploy_targets`` with the tasks
  (owner/task) allowed to write it.  A task names it, or gives its path as
  the seed experiment's ``deploy_target:`` does.  One target is mounted
  writable at ``/deploy``, several at ``/deploy/<name>``.  A target that does
  not exist, is not a directory, or is reached through a symlink is refused.
  Nothing a task writes there gains privileges on the host: see
  :mod:`agent.host.privileges`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from .config import AgentConfig, DeployTarget
from .errors import RunFailed
from .host.engine import Mount
from .host.privileges import clear_privileges
from .model import Task


class Refused(RunFailed):
    code = "refused"


def secret_path(cfg: AgentConfig, owner: str, name: str) -> Path:
    return cfg.secrets_base / "tasks" / owner / name


def _real_directory(path: Path) -> bool:
    return path.is_dir() and os.path.realpath(path) == str(path)


def secret_mounts(cfg: AgentConfig, task: Task) -> list[Mount]:
    mounts = []
    for name in task.secrets:
        path = secret_path(cfg, task.owner, name)
        if not path.exists() or os.path.realpath(path) != str(path):
            raise Refused(f"task {task.qualified_name} declares secret {name!r}, but there is no "
                          f"{path} (a file or directory, not a symlink); put it there first")
        mounts.append(Mount("bind", str(path), f"/run/secrets/{name}", readonly=True))
    return mounts


def _target(cfg: AgentConfig, wanted: str) -> DeployTarget:
    for target in cfg.deploy_targets.values():
        if wanted in (target.name, str(target.path)):
            return target
    raise Refused(f"deploy target {wanted!r} is not in {cfg.source}'s deploy_targets; an "
                  "administrator must add it there (with the tasks allowed to write it)")


def deploy_targets(cfg: AgentConfig, task: Task) -> list[DeployTarget]:
    """The deploy targets the task may write, or Refused."""
    targets = [_target(cfg, wanted) for wanted in task.deploy_targets]
    for target in targets:
        if task.qualified_name not in target.allow:
            allowed = ", ".join(target.allow) or "no task"
            raise Refused(f"task {task.qualified_name} may not write deploy target "
                          f"{target.name} ({target.path}); it allows {allowed}")
        if not _real_directory(target.path):
            raise Refused(f"deploy target {target.name}: {target.path} is not a directory, or "
                          "is reached through a symlink")
    return targets


def deploy_mounts(cfg: AgentConfig, task: Task) -> list[Mount]:
    targets = deploy_targets(cfg, task)
    return [Mount("bind", str(t.path), "/deploy" if len(targets) == 1 else f"/deploy/{t.name}",
                  readonly=False) for t in targets]


def host_mounts(cfg: AgentConfig, task: Task) -> list[Mount]:
    """Every mount of secrets and deploy targets, or Refused."""
    return secret_mounts(cfg, task) + deploy_mounts(cfg, task)


async def sweep_target(path: Path, say: Callable[[str], object]) -> None:
    """Take away what a task left in a deploy target that would give it
    privileges on the host; ``say`` tells the run's log what was done."""
    try:
        done = await trio.to_thread.run_sync(clear_privileges, path)
    except OSError as e:
        say(f"deploy target {path}: could not be checked for setuid files and devices "
            f"({e.strerror}); check it by hand")
        return
    for line in done:
        say(f"deploy target {path}: {line} (a task may not leave privileges on the host)")
