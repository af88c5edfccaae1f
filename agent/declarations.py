"""Image and task declarations: ``conf.d/*.yml``.

A file is either the general form::

    owner: alice            # optional; agent.yml's owner otherwise
    images:
      NAME: {dockerfile: PATH | inline: TEXT, context: DIR}
    tasks:
      NAME: {image: ..., command: ..., checkout: {repositories: [...]}, ...}

or the seed experiment's single-task form (its config.yml, unchanged): ``user``
is the owner, ``task:`` the task, ``checkout:`` sits beside it, and the task
is named after the file.  Each file is parsed on its own; :func:`assemble`
combines the files, checks names across them and keeps a file's last good
version when its new one is broken (a broken file is refused whole).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import names
from .errors import ConfigError
from .host.git import ssh_host
from .model import CacheUse, Image, Limits, Network, PushTrigger, Repository, Stage, Task
from .yamlconf import Node, load_file

TASK_KEYS = {"image", "command", "env", "checkout", "secrets", "caches", "deploy_target",
             "deploy_targets", "network", "time_limit", "stages", "on", "limits"}
REPO_KEYS = {"repo_url", "revision", "mutable", "key", "submodules", "name"}
MIN_MEMORY = 6 << 20  # docker refuses less
MIN_DISK = 1 << 20  # less would stop a task at its first few files
UNBOUNDED = Limits()  # no maxima (the agent passes agent.yml's)


@dataclass
class FileDeclarations:
    """What one file declares."""

    file: str
    images: dict[str, Image] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# -- fields -------------------------------------------------------------------

def _names(node: Node) -> tuple[str, ...]:
    return tuple(n.name() for n in node.sequence())


def _command(node: Node) -> tuple[str, ...]:
    """A list of arguments, or a string run by the image's /bin/sh -c.

    The string form runs a shell *inside the task container*, as any CI
    script does; nothing from a declaration is ever run by a host shell.
    """
    if node.is_sequence():
        argv = tuple(n.string() for n in node.sequence())
        if not argv:
            raise node.error("must not be an empty list")
        return argv
    return ("/bin/sh", "-c", node.string(max_len=65536))


def _env(node: Node) -> dict[str, str]:
    env: dict[str, str] = {}
    for key, value in node.mapping(free=True).items():
        if not names.ENV_NAME.fullmatch(key):
            raise value.error(f"{key!r} is not an environment variable name")
        env[key] = value.string(max_len=65536)
    return env


def _repository(node: Node) -> Repository:
    fields = node.mapping(required={"repo_url", "revision", "key"}, optional=REPO_KEYS)
    url_node = fields["repo_url"]
    url = url_node.string(max_len=2048)
    if url.startswith("-") or "::" in url.split("/")[0] or url.startswith(("file:", "ext:")):
        raise url_node.error(
            f"{url!r} is not an ssh repository URL (options, ext:: and file:// are refused)")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise url_node.error("must not contain spaces or control characters")
    if ssh_host(url) is None:
        raise url_node.error(
            f"{url!r} is not an ssh repository URL: write ssh://[user@]host[:port]/path or "
            "[user@]host:path, with a host name or address that does not begin with '-' "
            "and a port from 1 to 65535")
    mutable = fields["mutable"].boolean() if "mutable" in fields else False
    rev_node = fields["revision"]
    revision = rev_node.string(max_len=255)
    if not mutable and not names.FULL_SHA.fullmatch(revision):
        raise rev_node.error(
            f"{revision!r} is not a full commit sha; a ref name needs mutable: true "
            "(it is re-checked out on every run)")
    problem = names.ref_format_problem(revision)
    if problem:
        raise rev_node.error(f"{revision!r} is not a valid revision: it {problem}")
    if "name" in fields:
        mount_name = fields["name"].name()
    else:
        base = posixpath.basename(url.rstrip("/").split(":")[-1])
        mount_name = base[:-4] if base.endswith(".git") else base
        if not names.is_name(mount_name):
            raise url_node.error(
                f"its basename {mount_name!r} cannot be a mount name; set name: explicitly")
    return Repository(
        repo_url=url,
        revision=revision,
        mutable=mutable,
        key=fields["key"].name(),
        submodules=fields["submodules"].boolean() if "submodules" in fields else False,
        mount_name=mount_name,
        entry=node.plain_value(),  # type: ignore[arg-type]
    )


def _checkout(node: Node) -> tuple[tuple[Repository, ...], bool]:
    """The repositories, and whether unpinned host keys are accepted."""
    fields = node.mapping(required={"repositories"}, optional={"unchecked_host_keys"})
    unchecked = fields["unchecked_host_keys"].boolean() if "unchecked_host_keys" in fields \
        else False
    repos = tuple(_repository(n) for n in fields["repositories"].sequence())
    seen: dict[str, int] = {}
    for i, repo in enumerate(repos):
        if repo.mount_name in seen:
            raise node.error(f"repositories {seen[repo.mount_name]} and {i} both mount at "
                             f"/src/{repo.mount_name}; give one a name:")
        seen[repo.mount_name] = i
    return repos, unchecked


# Where the agent mounts its own things in a task container: a cache there
# (or above it) would shadow them.
RESERVED_PATHS = ("/src", "/deploy", "/run/secrets", "/run/efci")


def _caches(node: Node) -> tuple[CacheUse, ...]:
    caches: list[CacheUse] = []
    for item in node.sequence():
        f = item.mapping(required={"name", "path"},
                         optional={"quota", "shared", "layered", "promote"})
        name = f["name"].name()
        path = f["path"].string()
        if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
            raise f["path"].error(f"must be a normalised absolute path in the container, "
                                  f"not {path!r}")
        for reserved in RESERVED_PATHS:
            if path == reserved or path.startswith(reserved + "/") or \
                    reserved.startswith(path + "/"):
                raise f["path"].error(f"{path} would shadow {reserved}, where the agent mounts "
                                      "its own; choose another path")
        for other in caches:
            if other.name == name:
                raise f["name"].error(f"cache {name!r} is already used by this task, at "
                                      f"{other.path}")
            if other.path == path:
                raise f["path"].error(f"cache {other.name!r} is already mounted at {path}")
        layered = f["layered"].boolean() if "layered" in f else False
        promote = f["promote"].string() if "promote" in f else "never"
        if promote not in ("never", "on-success"):
            raise f["promote"].error(f"must be never or on-success, not {promote!r}")
        if promote == "on-success" and not layered:
            raise f["promote"].error("only a layered cache is promoted (layered: true); a "
                                     "plain cache takes every write at once")
        caches.append(CacheUse(name, path, f["quota"].size() if "quota" in f else None,
                               f["shared"].boolean() if "shared" in f else False,
                               layered, promote == "on-success", f"{item.file}:{item.line}"))
    return tuple(caches)


STAGE_KEYS = {"image", "command", "env", "time_limit", "secrets", "caches", "deploy_targets",
              "allow_failure"}
# Stage N's overlay stacks N-1 layers over the base worktree; the kernel takes
# up to 500 lower layers, but all their paths must fit in one page of mount
# options, which a few dozen long volume paths fill.
MAX_STAGES = 32


def _stages(node: Node) -> tuple[Stage, ...]:
    stages = []
    seen: set[str] = set()
    for item in node.sequence():
        f = item.mapping(required={"name"}, optional=STAGE_KEYS)
        name = f["name"].name()
        if name in seen:
            raise f["name"].error(f"stage {name!r} is declared twice")
        seen.add(name)
        stages.append(Stage(
            name=name,
            image=f["image"].image_ref() if "image" in f else None,
            command=_command(f["command"]) if "command" in f else None,
            env=_env(f["env"]) if "env" in f else {},
            time_limit=f["time_limit"].duration() if "time_limit" in f else None,
            secrets=_names(f["secrets"]) if "secrets" in f else None,
            caches=_caches(f["caches"]) if "caches" in f else None,
            deploy_targets=_deploy_targets(f) if "deploy_targets" in f else None,
            allow_failure=f["allow_failure"].boolean() if "allow_failure" in f else False,
        ))
    if len(stages) > MAX_STAGES:
        raise node.error(f"{len(stages)} stages are more than {MAX_STAGES}: each stage's "
                         "layer is one more lower layer of the next one's overlay")
    return tuple(stages)


def _deploy_targets(fields: dict[str, Node]) -> tuple[str, ...]:
    targets: list[str] = []
    if "deploy_target" in fields:  # the experiment's single path
        node = fields["deploy_target"]
        path = node.string()
        if not path.startswith("/") or posixpath.normpath(path) != path:
            raise node.error(f"must be a normalised absolute path, not {path!r}")
        targets.append(path)
    if "deploy_targets" in fields:
        targets += _names(fields["deploy_targets"])
    return tuple(targets)


def _limits(node: Node, most: Limits) -> Limits:
    """A task's resources; none past agent.yml's maxima."""
    fields = node.mapping(optional={"cpus", "memory", "swap", "pids", "disk"})

    def at_most(key: str, value: float, limit: float | None, shown: str) -> None:
        if limit is not None and value > limit:
            raise fields[key].error(f"{shown} is more than this agent allows: at most "
                                    f"{_shown(key, limit)} (limits.max_{key} in agent.yml)")

    found: dict[str, Any] = {}
    if "cpus" in fields:
        text = fields["cpus"].raw_scalar().strip()
        if not re.fullmatch(r"[0-9]{1,4}(\.[0-9]{1,2})?", text) or float(text) < 0.01:
            raise fields["cpus"].error(f"must be a number of CPUs such as 2 or 0.5, not {text!r}")
        found["cpus"] = float(text)
    if "memory" in fields:
        found["memory"] = fields["memory"].size()
        if found["memory"] < MIN_MEMORY:
            raise fields["memory"].error(f"must be at least {names.format_size(MIN_MEMORY)} "
                                         "(docker's least)")
    if "swap" in fields:
        found["swap"] = (0 if fields["swap"].raw_scalar().strip() == "0"
                         else fields["swap"].size())
    if "pids" in fields:
        found["pids"] = fields["pids"].integer(minimum=64)
    if "disk" in fields:
        found["disk"] = fields["disk"].size()
        if found["disk"] < MIN_DISK:
            raise fields["disk"].error(f"must be at least {names.format_size(MIN_DISK)}")
    for key, value in found.items():
        at_most(key, value, getattr(most, key), _shown(key, value))
    return Limits(**found)


def _shown(key: str, value: float) -> str:
    if key in ("memory", "swap", "disk"):
        return names.format_size(int(value))
    return f"{value:g}"


def _task(name: str, owner: str, node: Node, fields: dict[str, Node],
          checkout: tuple[tuple[Repository, ...], bool], most: Limits) -> Task:
    if "checkout" in fields:
        checkout = _checkout(fields["checkout"])
    repositories, unchecked_host_keys = checkout
    network = Network.DEFAULT
    if "network" in fields:
        value = fields["network"].string()
        try:
            network = Network(value)
        except ValueError:
            raise fields["network"].error(
                f"must be 'default' or 'none', not {value!r} (host networking is never "
                "given to tasks)") from None
    return Task(
        name=name,
        owner=owner,
        source=f"{node.file}:{node.line}",
        image=fields["image"].image_ref(),
        command=_command(fields["command"]) if "command" in fields else None,
        env=_env(fields["env"]) if "env" in fields else {},
        repositories=repositories,
        secrets=_names(fields["secrets"]) if "secrets" in fields else (),
        caches=_caches(fields["caches"]) if "caches" in fields else (),
        deploy_targets=_deploy_targets(fields),
        network=network,
        time_limit=fields["time_limit"].duration() if "time_limit" in fields else None,
        stages=_stages(fields["stages"]) if "stages" in fields else (),
        unchecked_host_keys=unchecked_host_keys,
        on_push=_on(fields["on"], repositories) if "on" in fields else None,
        limits=_limits(fields["limits"], most) if "limits" in fields else Limits(),
    )


def _on(node: Node, repositories: tuple[Repository, ...]) -> PushTrigger:
    """``on: {push: {branches: [PATTERN...], tags: [PATTERN...]}}``."""
    push = node.mapping(required={"push"})["push"]
    f = push.mapping(optional={"branches", "tags"})
    if not f:
        raise push.error("needs branches: or tags: (a list of patterns such as main or v*)")
    if not any(r.mutable for r in repositories) and "branches" in f:
        raise f["branches"].error("a push to a branch can only start a task that checks out "
                                  "a branch (an entry with mutable: true)")
    patterns = {}
    for key in ("branches", "tags"):
        found = []
        for item in f[key].sequence() if key in f else []:
            text = item.string(max_len=255)
            # A pattern is a ref name with * in it: check it with * as a letter.
            problem = names.ref_format_problem(text.replace("*", "x"))
            if problem:
                raise item.error(f"{text!r} is not a ref pattern: it {problem}")
            found.append(text)
        patterns[key] = tuple(found)
    return PushTrigger(branches=patterns["branches"], tags=patterns["tags"])


def resolved_inside(base_dir: Path, path: Path) -> Path | None:
    """``path`` with every symlink resolved, if that is inside ``base_dir``
    (resolved too); None if it leads outside."""
    base, real = Path(os.path.realpath(base_dir)), Path(os.path.realpath(path))
    return real if real == base or base in real.parents else None


def _image_decl(name: str, node: Node, base_dir: Path) -> Image:
    f = node.mapping(optional={"dockerfile", "inline", "context"})
    if ("dockerfile" in f) == ("inline" in f):
        raise node.error("needs exactly one of dockerfile: (a path) or inline: (its text)")

    def inside(key: str, kind: str) -> Path:
        text = f[key].string()
        path = None if text.startswith("/") else resolved_inside(base_dir, base_dir / text)
        if path is None:
            raise f[key].error(f"must be a path inside {base_dir} (symlinks resolved), "
                               f"not {text!r}")
        if not (path.is_dir() if kind == "directory" else path.is_file()):
            raise f[key].error(f"{text!r} is not a {kind} (looked for {path})")
        return path

    return Image(
        name=name,
        source=f"{node.file}:{node.line}",
        context=inside("context", "directory") if "context" in f
        else Path(os.path.realpath(base_dir)),
        dockerfile=inside("dockerfile", "file") if "dockerfile" in f else None,
        inline=f["inline"].string(max_len=65536) if "inline" in f else None,
    )


# -- files --------------------------------------------------------------------

def parse_file(path: Path, *, default_owner: str, secrets_base: Path,
               gitea_api: str = "", most: Limits = UNBOUNDED) -> FileDeclarations:
    """Parse one declaration file; raises ConfigError for the first problem."""
    root = load_file(path)
    out = FileDeclarations(str(path))
    if root is None:
        return out
    top = root.mapping(optional={"owner", "user", "images", "tasks", "task", "checkout",
                                 "secrets_base", "gitea_api_base"})
    if "owner" in top and "user" in top:
        raise top["user"].error("give owner: or user:, not both")
    owner_node = top.get("owner") or top.get("user")
    owner = owner_node.name() if owner_node else default_owner

    if "task" in top:  # the experiment's single-task form
        if "tasks" in top or "images" in top:
            raise top["task"].error("a file with task: declares one task; use tasks: for more")
        name = path.stem
        if not names.is_name(name):
            raise ConfigError(str(path), 0, "", f"the file name {name!r} is not a task name "
                              f"({names.NAME_HELP})")
        fields = top["task"].mapping(required={"image"}, optional=TASK_KEYS)
        if "checkout" in top and "checkout" in fields:
            raise fields["checkout"].error("checkout: is already given at the top of the file")
        checkout = _checkout(top["checkout"]) if "checkout" in top else ((), False)
        out.tasks[name] = _task(name, owner, top["task"], fields, checkout, most)
        if "secrets_base" in top:
            declared = Path(top["secrets_base"].string())
            if declared != secrets_base:
                out.warnings.append(
                    f"{path}:{top['secrets_base'].line}: secrets_base {declared} is ignored; "
                    f"the agent's secrets store is {secrets_base} (agent.yml paths.secrets)")
        if "gitea_api_base" in top:
            _gitea_api_base(top["gitea_api_base"], gitea_api, out)
        return out

    for key in ("checkout", "secrets_base", "gitea_api_base"):
        if key in top:
            raise top[key].error("only allowed beside task: (the single-task form)")
    if "images" in top:
        for name, node in top["images"].mapping(free=True).items():
            if not names.is_name(name):
                raise node.error(f"image name {name!r} is not {names.NAME_HELP}")
            out.images[name] = _image_decl(name, node, path.parent)
    if "tasks" in top:
        for name, node in top["tasks"].mapping(free=True).items():
            if not names.is_name(name):
                raise node.error(f"task name {name!r} is not {names.NAME_HELP}")
            fields = node.mapping(required={"image"}, optional=TASK_KEYS)
            out.tasks[name] = _task(name, owner, node, fields, ((), False), most)
    return out


def _gitea_api_base(node: Node, gitea_api: str, out: FileDeclarations) -> None:
    """The experiment's ``gitea_api_base`` is agent.yml's ``gitea.api``: the
    token goes only to the API the administrator configured, so a file that
    names another one is refused rather than checked against the wrong server."""
    declared = node.string().rstrip("/")
    if not gitea_api:
        out.warnings.append(
            f"{node.file}:{node.line}: gitea_api_base {declared} is not used: this agent has "
            f"no Gitea API; set gitea.api: {declared} in agent.yml (and the token) to verify "
            "literal shas and send commit statuses")
    elif declared != gitea_api:
        raise node.error(f"gitea_api_base {declared!r} is not this agent's Gitea API "
                         f"{gitea_api!r} (gitea.api in agent.yml); make them equal or remove "
                         "the line")


@dataclass
class DeclarationSet:
    """The declarations in force, and what went wrong loading them."""

    images: dict[str, Image] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    by_file: dict[str, FileDeclarations] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # file -> message
    warnings: list[str] = field(default_factory=list)


def declaration_files(directory: Path) -> list[Path]:
    """Every ``*.yml`` entry of the directory, whatever it is (see :func:`parse_all`)."""
    return sorted(directory.glob("*.yml")) if directory.is_dir() else []


def _not_a_declaration(path: Path, directory: Path) -> FileDeclarations | ConfigError | None:
    """Why an entry named ``*.yml`` is not read: a warning for what is
    plainly not meant as one (a directory, a dangling symlink), an error for
    what must not be read (a symlink leading outside the directory, whose
    content an error message could otherwise quote; a FIFO or device)."""
    if path.is_symlink():
        if not path.exists():
            return FileDeclarations(str(path), warnings=[
                f"{path}: a symlink to {os.readlink(path)}, which does not exist; ignored"])
        if resolved_inside(directory, path) is None:
            return ConfigError(str(path), 0, "", f"a symlink to a file outside {directory}; "
                               "refused: declarations are only read from inside it")
    if path.is_dir():
        return FileDeclarations(str(path), warnings=[f"{path}: a directory, not a file; ignored"])
    if not path.is_file():
        return ConfigError(str(path), 0, "", "not a regular file; refused")
    return None


def parse_all(directory: Path, *, default_owner: str, secrets_base: Path,
              gitea_api: str = "",
              most: Limits = UNBOUNDED) -> dict[str, FileDeclarations | ConfigError]:
    """Every file's parse, or its error."""
    results: dict[str, FileDeclarations | ConfigError] = {}
    for path in declaration_files(directory):
        refused = _not_a_declaration(path, directory)
        if refused is not None:
            results[str(path)] = refused
            continue
        try:
            results[str(path)] = parse_file(path, default_owner=default_owner,
                                            secrets_base=secrets_base, gitea_api=gitea_api,
                                            most=most)
        except ConfigError as e:
            results[str(path)] = e
    return results


def image_refs(parsed: dict[str, FileDeclarations | ConfigError],
               previous: DeclarationSet | None) -> set[str]:
    """Images that tasks name, in the new files and in the last good versions
    :func:`assemble` may fall back to: those not declared must exist in Docker."""
    files = [f for f in parsed.values() if isinstance(f, FileDeclarations)]
    files += previous.by_file.values() if previous else []
    refs = set()
    for f in files:
        for task in f.tasks.values():
            refs |= {task.image} | {s.image for s in task.stages if s.image}
    return refs - {n for f in files for n in f.images}


def assemble(parsed: dict[str, FileDeclarations | ConfigError], *,
             existing_images: set[str], previous: DeclarationSet | None) -> DeclarationSet:
    """Combine files into one set, each file whole or not at all.

    A file that fails to parse or conflicts with the others is refused; its
    last good version (from ``previous``) stays in force and the error is
    kept for ``efci status``.
    """
    result = DeclarationSet()
    candidates: dict[str, FileDeclarations] = {}
    for file, item in parsed.items():
        if isinstance(item, ConfigError):
            result.errors[file] = item.message
            if previous and file in previous.by_file:
                candidates[file] = previous.by_file[file]
        else:
            candidates[file] = item

    declared_images = {n: f for f, decl in candidates.items() for n in decl.images}
    for file, decl in candidates.items():
        try:
            _check_against(file, decl, result, declared_images, existing_images)
        except ConfigError as e:
            result.errors[file] = e.message
            old = previous.by_file.get(file) if previous else None
            if old is None or old is decl:
                continue
            try:
                _check_against(file, old, result, declared_images, existing_images)
            except ConfigError:
                continue
            decl = old
        result.by_file[file] = decl
        result.images.update(decl.images)
        result.tasks.update(decl.tasks)
        result.warnings += decl.warnings
    return result


def _check_cache(file: str, name: str, task: Task, use: CacheUse,
                 so_far: DeclarationSet) -> None:
    """One cache, declared by several tasks of its owner, must be declared
    alike: shared by all of them, with the same quota and layering."""
    for other in so_far.tasks.values():
        if other.owner != task.owner:
            continue
        for theirs in other.all_caches:
            if theirs.name != use.name:
                continue
            if not (use.shared and theirs.shared):
                private = theirs if not theirs.shared else use
                raise ConfigError(file, int(use.source.rsplit(":", 1)[1]),
                                  f"tasks.{name}.caches",
                                  f"cache {use.name!r} of {task.owner} is declared by task "
                                  f"{other.name} ({theirs.source}) and here ({use.source}), but "
                                  f"{private.source} makes it private; give shared: true in "
                                  "both, or another name")
            for what in ("quota", "layered"):
                if getattr(use, what) != getattr(theirs, what):
                    raise ConfigError(
                        file, int(use.source.rsplit(":", 1)[1]), f"tasks.{name}.caches",
                        f"cache {use.name!r} of {task.owner} has {what} {getattr(use, what)} "
                        f"here ({use.source}) but {getattr(theirs, what)} in task {other.name} "
                        f"({theirs.source}); declare it alike in both")


def _check_against(file: str, decl: FileDeclarations, so_far: DeclarationSet,
                   declared_images: dict[str, str], existing_images: set[str]) -> None:
    for name, task in decl.tasks.items():
        if name in so_far.tasks:
            raise ConfigError(file, 0, f"tasks.{name}",
                              f"task {name!r} is already declared at {so_far.tasks[name].source}")
        for ref, where in [(task.image, "image")] + [
                (s.image, f"stages.{s.name}.image") for s in task.stages if s.image]:
            if ref not in declared_images and ref not in existing_images:
                line = int(task.source.rsplit(":", 1)[1])
                raise ConfigError(file, line, f"tasks.{name}.{where}",
                                  f"image {ref!r} is neither declared under images: nor present "
                                  "in Docker (docker image ls)")
        for use in task.all_caches:
            _check_cache(file, name, task, use, so_far)
    for name in decl.images:
        if name in so_far.images:
            raise ConfigError(file, 0, f"images.{name}",
                              f"image {name!r} is already declared at {so_far.images[name].source}")
