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
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import AgentConfig, DeployTarget
from .errors import RunFailed
from .host.docker import Mount
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


def deploy_mounts(cfg: AgentConfig, task: Task) -> list[Mount]:
    targets = [_target(cfg, wanted) for wanted in task.deploy_targets]
    mounts = []
    for target in targets:
        if task.qualified_name not in target.allow:
            allowed = ", ".join(target.allow) or "no task"
            raise Refused(f"task {task.qualified_name} may not write deploy target "
                          f"{target.name} ({target.path}); it allows {allowed}")
        if not _real_directory(target.path):
            raise Refused(f"deploy target {target.name}: {target.path} is not a directory, or "
                          "is reached through a symlink")
        inside = "/deploy" if len(targets) == 1 else f"/deploy/{target.name}"
        mounts.append(Mount("bind", str(target.path), inside, readonly=False))
    return mounts


def host_mounts(cfg: AgentConfig, task: Task) -> list[Mount]:
    """Every mount of secrets and deploy targets, or Refused."""
    return secret_mounts(cfg, task) + deploy_mounts(cfg, task)
