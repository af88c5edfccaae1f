"""``efci``: the agent (``efci agent``) and its command-line client.

Every subcommand but ``agent`` and ``config`` talks to the running agent
over its unix socket.  Output is for people; ``--json`` prints the agent's
answers as JSON for scripts (one object, or one per line while streaming).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from . import __version__, layout, views
from .client import Client
from .errors import EfciError, printable

# A client command imports little: typing, dataclasses and the settings
# table together took longer than the rest of its start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .config import AgentConfig, Layout

    View = Callable[[Any], int]

# efci run --follow exits like the task; these for the other endings.
EXIT_BY_STATUS = {"timed_out": 124, "cancelled": 130, "error": 1}


class _Formatter(argparse.HelpFormatter):
    """argparse makes a formatter for each argument it is given, to check
    its metavar, and each asked for the terminal's width: 2 ms of a short
    command, for help that is seldom printed.  Asked once, as
    shutil.get_terminal_size asks (without importing shutil, 1.5 ms more)."""

    columns: int | None = None

    def __init__(self, prog: str) -> None:
        if _Formatter.columns is None:
            try:
                columns = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()  # type: ignore[union-attr]
                                                   ).columns
                except (AttributeError, ValueError, OSError):  # none, closed, not a terminal
                    columns = 0
            _Formatter.columns = (columns or 80) - 2  # argparse's own margin
        super().__init__(prog, width=_Formatter.columns)


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_Formatter, **kwargs)


def _parser() -> argparse.ArgumentParser:
    # argparse looks on disk for a translation of its own words (usage,
    # options, ...) at each of the ~120 times it takes one while efci's
    # parser is built: a sixth of a short command's time.  efci speaks
    # English, and Python ships no such translation.
    argparse._ = str  # type: ignore[attr-defined]
    p = _Parser(prog="efci", description="efforting-ci: a CI host agent and "
                                "its control client (see efci(1)).")
    p.add_argument("--version", action="version", version=f"efforting-ci {__version__}")
    p.add_argument("--root", metavar="DIR", help="put every default path under DIR "
                   "(also EFCI_ROOT)")
    p.add_argument("--config", metavar="FILE",
                   help="agent.yml (default: /etc/efforting-ci/agent.yml, or DIR/etc/agent.yml)")
    p.add_argument("--socket", metavar="PATH",
                   help="the agent's socket (default: from agent.yml; also EFCI_SOCKET)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    # The common options are accepted after the subcommand too (efci agent
    # --config FILE, efci runs --json); SUPPRESS keeps a subcommand's absent
    # option from overwriting one given before it.
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    a = add("agent", "run the agent daemon")
    a.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    c = add("config", "agent.yml helpers")
    c.add_argument("action", choices=["example", "check"],
                   help="example: print a complete commented agent.yml; check: validate it")

    w = add("web", "serve the web page (the unprivileged efforting-ci-web service)")
    w.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add("web-login", "print a one-time URL that logs a browser in to the web page")
    wo = add("web-logout", "end web sessions")
    wo.add_argument("--all", action="store_true", required=True,
                    help="end every session and unused login URL")
    add("status", "what the agent is doing and what it loaded")
    add("tasks", "list declared tasks")
    add("images", "list declared images, their tags and whether they are built")
    im = add("image", "image actions")
    ims = im.add_subparsers(dest="action", required=True, metavar="ACTION")
    ib = ims.add_parser("build", help="build a declared image now, as a run", parents=[common])
    ib.add_argument("name")
    ib.add_argument("-f", "--follow", action="store_true", help="stream the build's output")
    add("reload", "re-read the declarations in conf.d")
    r = add("run", "start a run of TASK")
    r.add_argument("task")
    r.add_argument("-f", "--follow", action="store_true",
                   help="stream its output and exit with its exit status")
    rs = add("runs", "list recent runs")
    rs.add_argument("--task", help="only runs of this task")
    rs.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    s = add("show", "one run's record")
    s.add_argument("run", type=int)
    lg = add("logs", "print a run's output, byte for byte")
    lg.add_argument("run", type=int)
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")
    lg.add_argument("--stream", metavar="NAME",
                    help="only this stream's output: task, or checkout:NAME for a checkout")
    lg.add_argument("--raw", action="store_true",
                    help="the output bytes only, nothing else, even on stderr")
    lg.add_argument("-t", "--timestamps", action="store_true",
                    help="prefix each line with the time it was printed")
    lg.add_argument("--since", metavar="WHEN", help="from a time: 10m (ago) or 2026-11-28T17:00")
    lg.add_argument("-n", "--tail", metavar="N", type=int, help="only the last N lines")
    lg.add_argument("--position", type=int, default=0, metavar="POS",
                    help="resume at a position (from --json output's 'next')")
    cn = add("cancel", "stop a run (its container is stopped)")
    cn.add_argument("run", type=int)

    rs2 = add("restart", "start a finished run's container again, as a new attempt")
    rs2.add_argument("run", type=int)
    rs2.add_argument("--stage", help="in a pipeline, the stage whose container to start again")
    rs2.add_argument("-f", "--follow", action="store_true",
                     help="stream the attempt's output and exit with its exit status")
    rt = add("retry", "run a finished pipeline again from one stage, over the layers the "
                      "stages before it left (they do not run again)")
    rt.add_argument("run", type=int)
    rt.add_argument("--from", dest="stage", required=True, metavar="STAGE")
    rt.add_argument("-f", "--follow", action="store_true",
                    help="stream the attempt's output and exit with its exit status")
    gcp = add("gc", "remove what agent.yml's gc policy says may go (runs' containers and "
                    "layers, old logs, unused worktrees, orphans), saying why and what it frees")
    gcp.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    gcp.add_argument("--owner", help="only this owner's base worktrees")
    fw = add("firewall", "the task bridge's rules: status, probe, remove")
    fw.add_argument("action", choices=["status", "probe", "remove"])
    sh = add("shell", "an interactive shell in a finished run's environment (same image state, "
                      "same worktrees)")
    sh.add_argument("run", type=int)
    sh.add_argument("--stage", help="a pipeline's stage: the shell opens in its container, "
                                    "over the layers the stages before it left")
    sh.add_argument("--discard", action="store_true",
                    help="throw away what you change outside /src (by default `efci restart` "
                         "runs with it)")
    rm = add("rm", "remove a finished run's container and its layers (the log stays)")
    rm.add_argument("run", type=int)

    k = add("key", "deploy keys and pinned host keys (efci key ACTION --help)")
    ks = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    owner_help = "whose key (default: agent.yml's owner)"
    for action, text in (("create", "make an ed25519 key pair; prints the public half"),
                         ("show", "the public half, to add as a read-only deploy key"),
                         ("delete", "remove a key pair")):
        ka = ks.add_parser(action, help=text, parents=[common])
        ka.add_argument("name")
        ka.add_argument("--owner", help=owner_help)
        if action == "delete":
            ka.add_argument("--force", action="store_true",
                            help="delete even if declared tasks use it")
    kr = ks.add_parser("register", help="add the public half to a Gitea repository as a "
                       "read-only deploy key (needs gitea.api and its token)", parents=[common])
    kr.add_argument("name")
    kr.add_argument("--repo", required=True, metavar="OWNER/REPO",
                    help="the repository as Gitea names it")
    kr.add_argument("--owner", help=owner_help)
    kl = ks.add_parser("list", help="list key pairs", parents=[common])
    kl.add_argument("--owner", help="only this owner's")
    kt = ks.add_parser("trust", help="pin a git server's ssh host key", parents=[common])
    kt.add_argument("host")
    kt.add_argument("--port", type=int, default=22)
    kt.add_argument("--owner", help=owner_help)
    kt.add_argument("--keys", metavar="FILE",
                    help="known_hosts lines to pin (- for stdin), e.g. from the server's "
                         "/etc/ssh/ssh_host_*_key.pub; without it, ssh-keyscan asks the host")

    c = add("cache", "caches: btrfs subvolumes with quotas (efci cache ACTION --help)")
    cs = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cache_owner = "whose cache (default: agent.yml's owner)"
    cs.add_parser("ls", help="every cache: owners, quota, usage from the kernel, runs using it",
                  parents=[common])
    cq = cs.add_parser("set-quota", help="change a cache's quota (over its declaration's)",
                       parents=[common])
    cq.add_argument("name")
    cq.add_argument("size", help="such as 512MiB or 20GiB")
    cq.add_argument("--owner", help=cache_owner)
    cr = cs.add_parser("rm", help="remove a cache and its data", parents=[common])
    cr.add_argument("name")
    cr.add_argument("--owner", help=cache_owner)
    cr.add_argument("--force", action="store_true",
                    help="even while declared tasks claim it (their next run starts empty)")
    cl = cs.add_parser("release", help="end a task's claim on a cache its declaration no longer "
                       "makes, now rather than after caches.release_grace", parents=[common])
    cl.add_argument("name")
    cl.add_argument("--project", required=True, metavar="TASK",
                    help="the task whose claim ends")
    cl.add_argument("--owner", help=cache_owner)
    cp = cs.add_parser("promote", help="make a run's view of a layered cache its next snapshot",
                       parents=[common])
    cp.add_argument("run", type=int)
    cp.add_argument("name")

    g = add("gitea", "the Gitea API the agent talks to (efci gitea check)")
    gs = g.add_subparsers(dest="action", required=True, metavar="ACTION")
    gs.add_parser("check", help="whether the API answers, whose token the agent holds, and "
                  "what it may do in each declared repository", parents=[common])
    return p


def entry() -> None:
    """The efci command (its launcher's and the package's entry point)."""
    sys.exit(main(fast_exit=True))


def main(argv: list[str] | None = None, *, fast_exit: bool = False) -> int:
    args = _parser().parse_args(argv)
    status = _dispatch(args)
    if fast_exit and args.command in COMMANDS:
        # A client's end without the interpreter's teardown, which freed
        # every module one by one: 4-5 ms of a 28 ms command.  What it
        # printed is out: _dispatch flushed stdout (and said so if it could
        # not), and stderr is line-buffered.
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os._exit(status)
    return status


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "agent":
            return _agent(args)
        if args.command == "web":
            return _web(args)
        if args.command == "config":
            return _config(args)
        if args.command == "shell":
            from .terminal import run_shell

            return run_shell(_socket_path(args), args.run, args.stage, args.discard)
        with Client(_socket_path(args)) as client:
            answer = COMMANDS[args.command](client, args)
        status = answer if isinstance(answer, int) else _show_answer(answer, args)
        sys.stdout.flush()  # here, where a failure to write is reported
        return status
    except EfciError as e:
        if args.json:
            print(json.dumps({"ok": False, "error": e.to_wire()}))
        else:
            print(f"efci: {e.message}", file=sys.stderr)
        return e.exit_status
    except BrokenPipeError:
        # A reader that stopped (efci logs RUN | head) is a normal end, as
        # for cat: no message, and nothing more written at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a file named on the command line, the terminal, ...
        where = f"{e.filename}: " if e.filename else ""
        print(printable(f"efci: {where}{e.strerror or e}"), file=sys.stderr)
        return 74  # EX_IOERR
    except KeyboardInterrupt:
        return 130


def _layout(args: argparse.Namespace) -> Layout:
    from .config import Layout  # only the daemon, the page and efci config need it all

    return Layout.from_environment(args.root)


def _load_config(args: argparse.Namespace) -> AgentConfig:
    from pathlib import Path

    from .config import load

    return load(_layout(args), Path(args.config) if args.config else None)


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if os.environ.get("EFCI_SOCKET"):
        return os.environ["EFCI_SOCKET"]
    return layout.socket_path(args.root, args.config)


def _log_to_stderr(verbose: bool) -> None:
    import logging  # the daemon's and the page's; the client starts faster without it

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        # journald stamps lines itself; elsewhere a time helps.
        format=("%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM")
                else "%(asctime)s %(levelname)s %(message)s"))


def _agent(args: argparse.Namespace) -> int:
    import trio  # only the daemon needs it: keeps client start-up fast

    from . import daemon

    _log_to_stderr(args.verbose)
    cfg = _load_config(args)
    trio.run(daemon.serve, cfg, strict_exception_groups=True)
    return 0


def _web(args: argparse.Namespace) -> int:
    import trio

    from .web import serve

    _log_to_stderr(args.verbose)
    cfg = _load_config(args)
    if args.socket:
        import dataclasses
        from pathlib import Path

        cfg = dataclasses.replace(cfg, socket_path=Path(args.socket))
    trio.run(serve.serve, cfg, strict_exception_groups=True)
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.action == "example":
        from .config import example

        sys.stdout.write(example(_layout(args)))
        return 0
    cfg = _load_config(args)
    print(json.dumps({"ok": True, "source": cfg.source}) if args.json
          else f"{cfg.source}: ok")
    return 0


# -- client commands: each asks the agent, then one output path shows it ---------

class Shown:
    """An answer and how a person sees it; ``--json`` prints the answer
    itself.  ``json_status`` is the exit status then (a view decides its own)."""

    def __init__(self, value: Any, view: View, json_status: int = 0) -> None:
        self.value, self.view, self.json_status = value, view, json_status


def _show_answer(shown: Shown, args: argparse.Namespace) -> int:
    if args.json:
        views.print_json(shown.value)
        return shown.json_status
    return shown.view(shown.value)


def _status(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("status"), views.status)


def _tasks(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("tasks"), views.tasks)


def _reload(client: Client, args: argparse.Namespace) -> Shown:
    result = client.call("reload")
    return Shown(result, views.reload, json_status=2 if result["errors"] else 0)


def _run(client: Client, args: argparse.Namespace) -> Shown | int:
    return _start_run(client, args, "run", {"task": args.task})


def _start_run(client: Client, args: argparse.Namespace, op: str,
               request: dict[str, Any]) -> Shown | int:
    if not args.follow:
        return Shown(client.call(op, request), views.queued)
    # The log's own agent messages say when it was queued, started and ended.
    run = client.call(op, {**request, "follow": True},
                      on_event=views.LogPrinter(as_json=args.json))
    if args.json:  # JSON lines: the records, then the run
        print(json.dumps(run))
    if run["exit_code"] is not None and run["status"] in ("succeeded", "failed"):
        return int(run["exit_code"])
    return 0 if run["status"] == "succeeded" else EXIT_BY_STATUS.get(run["status"], 1)


def _runs(client: Client, args: argparse.Namespace) -> Shown:
    request: dict[str, Any] = {"limit": args.limit}
    if args.task:
        request["task"] = args.task
    return Shown(client.call("runs", request), views.runs)


def _show(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("show", {"run": args.run}), views.show)


def _since_ns(text: str) -> int:
    """'10m' (ago) or a local time '2026-11-28T17:00:00' (or with a space)."""
    from .names import parse_duration

    seconds = parse_duration(text)
    if seconds is not None:
        return time.time_ns() - seconds * 1_000_000_000
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return int(time.mktime(time.strptime(text, fmt)) * 1e9)
        except ValueError:
            continue
    raise EfciError(f"--since {text!r}: give a duration ago (10m, 1h30m) or a local time "
                    "(2026-11-28T17:00:00)")


def _logs(client: Client, args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"run": args.run, "follow": args.follow,
                               "position": args.position}
    if args.since:
        request["since_ns"] = _since_ns(args.since)
    if args.tail is not None:
        request["tail"] = args.tail
    if args.raw and not (args.timestamps or args.json):  # the output bytes alone, in bulk
        request |= {"raw": True, **({"stream": args.stream} if args.stream else {})}
    printer = views.LogPrinter(raw=args.raw, timestamps=args.timestamps, as_json=args.json,
                               stream=args.stream)
    result = client.call("logs", request, on_event=printer,
                         on_output=printer.output if request.get("raw") else None)
    if args.json:  # JSON lines: the records, then where to resume
        print(json.dumps(result))
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("cancel", {"run": args.run}), views.cancelled)


def _images(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("images"), views.images)


def _image(client: Client, args: argparse.Namespace) -> Shown | int:
    return _start_run(client, args, "image_build", {"name": args.name})


def _restart(client: Client, args: argparse.Namespace) -> Shown | int:
    return _start_run(client, args, "restart", {"run": args.run,
                                                **({"stage": args.stage} if args.stage else {})})


def _retry(client: Client, args: argparse.Namespace) -> Shown | int:
    return _start_run(client, args, "retry", {"run": args.run, "stage": args.stage})


def _gc(client: Client, args: argparse.Namespace) -> Shown:
    request: dict[str, Any] = {"dry_run": args.dry_run}
    if args.owner:
        request["owner"] = args.owner
    return Shown(client.call("gc", request), views.collected)


def _rm(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("rm", {"run": args.run}), views.removed)


def _firewall(client: Client, args: argparse.Namespace) -> Shown:
    view = {"status": views.firewall_status, "probe": views.firewall_probe,
            "remove": views.firewall_remove}[args.action]
    return Shown(client.call(f"firewall_{args.action}"), view)


def _key(client: Client, args: argparse.Namespace) -> Shown:
    owner = {"owner": args.owner} if args.owner else {}
    if args.action == "list":
        return Shown(client.call("key_list", owner), views.keys)
    if args.action == "trust":
        request: dict[str, Any] = {"host": args.host, "port": args.port, **owner}
        if args.keys:
            if args.keys == "-":
                request["keys"] = sys.stdin.read()
            else:
                with open(args.keys) as f:
                    request["keys"] = f.read()
        return Shown(client.call("key_trust", request), views.trusted)
    request = {"name": args.name, **owner}
    if args.action == "register":
        return Shown(client.call("key_register", {**request, "repo": args.repo}),
                     views.key_registered)
    if args.action == "delete":
        return Shown(client.call("key_delete", {**request, "force": args.force}),
                     views.key_deleted)
    view = views.key_created if args.action == "create" else views.key
    return Shown(client.call(f"key_{args.action}", request), view)


def _cache(client: Client, args: argparse.Namespace) -> Shown:
    if args.action == "ls":
        return Shown(client.call("cache_ls"), views.caches)
    if args.action == "promote":
        return Shown(client.call("cache_promote", {"run": args.run, "name": args.name}),
                     views.cache_promoted)
    request: dict[str, Any] = {"name": args.name, **({"owner": args.owner} if args.owner else {})}
    if args.action == "set-quota":
        return Shown(client.call("cache_set_quota", {**request, "quota": args.size}),
                     views.cache_quota)
    if args.action == "release":
        return Shown(client.call("cache_release", {**request, "task": args.project}),
                     views.cache_released)
    return Shown(client.call("cache_rm", {**request, "force": args.force}), views.cache_removed)


def _gitea(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("gitea_check"), views.gitea_check)


def _web_login(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("web_login"), views.web_login)


def _web_logout(client: Client, args: argparse.Namespace) -> Shown:
    return Shown(client.call("web_logout", {"all": True}), views.web_logout)


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Shown | int]] = {
    "web-login": _web_login, "web-logout": _web_logout,
    "status": _status, "tasks": _tasks, "reload": _reload, "run": _run, "runs": _runs,
    "show": _show, "logs": _logs, "cancel": _cancel, "key": _key, "images": _images,
    "image": _image, "restart": _restart, "rm": _rm, "firewall": _firewall, "gitea": _gitea,
    "cache": _cache, "retry": _retry, "gc": _gc,
}
