"""``efci``: the agent (``efci agent``) and its command-line client.

Every subcommand but ``agent`` and ``config`` talks to the running agent
over its unix socket.  Output is for people; ``--json`` prints the agent's
answers as JSON for scripts (one object, or one per line while streaming).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from . import config as agentconfig
from .client import Client
from .errors import EfciError, printable

# efci run --follow exits like the task; these for the other endings.
EXIT_BY_STATUS = {"timed_out": 124, "cancelled": 130, "error": 1}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="efci", description="efforting-ci: a CI host agent and "
                                "its control client (see efci(1)).")
    p.add_argument("--version", action="version", version=f"efforting-ci {__version__}")
    p.add_argument("--root", metavar="DIR", help="put every default path under DIR "
                   "(also EFCI_ROOT)")
    p.add_argument("--config", metavar="FILE", type=Path,
                   help="agent.yml (default: /etc/efforting-ci/agent.yml, or DIR/etc/agent.yml)")
    p.add_argument("--socket", metavar="PATH", type=Path,
                   help="the agent's socket (default: from agent.yml; also EFCI_SOCKET)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    # The common options are accepted after the subcommand too (efci agent
    # --config FILE, efci runs --json); SUPPRESS keeps a subcommand's absent
    # option from overwriting one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", type=Path, default=argparse.SUPPRESS,
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
    rs2.add_argument("-f", "--follow", action="store_true",
                     help="stream the attempt's output and exit with its exit status")
    fw = add("firewall", "the task bridge's rules: status, probe, remove")
    fw.add_argument("action", choices=["status", "probe", "remove"])
    sh = add("shell", "an interactive shell in a finished run's environment (same image state, "
                      "same worktrees)")
    sh.add_argument("run", type=int)
    rm = add("rm", "remove a finished run's container and its mutations (the log stays)")
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
    kl = ks.add_parser("list", help="list key pairs", parents=[common])
    kl.add_argument("--owner", help="only this owner's")
    kt = ks.add_parser("trust", help="pin a git server's ssh host key", parents=[common])
    kt.add_argument("host")
    kt.add_argument("--port", type=int, default=22)
    kt.add_argument("--owner", help=owner_help)
    kt.add_argument("--keys", metavar="FILE", type=Path,
                    help="known_hosts lines to pin (- for stdin), e.g. from the server's "
                         "/etc/ssh/ssh_host_*_key.pub; without it, ssh-keyscan asks the host")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    layout = agentconfig.Layout.from_environment(args.root)
    try:
        if args.command == "agent":
            return _agent(args, layout)
        if args.command == "config":
            return _config(args, layout)
        if args.command == "shell":
            from .terminal import run_shell

            return run_shell(_socket_path(args, layout), args.run)
        with Client(_socket_path(args, layout)) as client:
            return COMMANDS[args.command](client, args)
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


def _load_config(args: argparse.Namespace,
                 layout: agentconfig.Layout) -> agentconfig.AgentConfig:
    return agentconfig.load(layout, args.config)


def _socket_path(args: argparse.Namespace, layout: agentconfig.Layout) -> Path:
    if args.socket:
        return Path(args.socket)
    if os.environ.get("EFCI_SOCKET"):
        return Path(os.environ["EFCI_SOCKET"])
    return _load_config(args, layout).socket_path


def _agent(args: argparse.Namespace, layout: agentconfig.Layout) -> int:
    import trio  # only the daemon needs it: keeps client start-up fast

    from . import daemon

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        # journald stamps lines itself; elsewhere a time helps.
        format=("%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM")
                else "%(asctime)s %(levelname)s %(message)s"))
    cfg = _load_config(args, layout)
    trio.run(daemon.serve, cfg, strict_exception_groups=True)
    return 0


def _config(args: argparse.Namespace, layout: agentconfig.Layout) -> int:
    if args.action == "example":
        sys.stdout.write(agentconfig.example(layout))
        return 0
    cfg = _load_config(args, layout)
    print(json.dumps({"ok": True, "source": cfg.source}) if args.json
          else f"{cfg.source}: ok")
    return 0


# -- client commands ------------------------------------------------------------

def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _duration(run: dict[str, Any]) -> str:
    start, end = run.get("started_at"), run.get("finished_at")
    if not start:
        return "-"
    return f"{(end or time.time()) - start:.1f}s"


def _progress(run: dict[str, Any]) -> str:
    parts = []
    if run.get("progress") is not None:
        parts.append(f"{run['progress'] * 100:.0f}%")
    if run.get("progress_message"):
        parts.append(run["progress_message"])
    return " ".join(parts) or "-"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _status(client: Client, args: argparse.Namespace) -> int:
    st = client.call("status")
    if args.json:
        _print_json(st)
        return 0
    d = st["declarations"]
    print(f"efforting-ci {st['version']} (pid {st['pid']}), up since {_when(st['started_at'])}")
    print(f"  config:       {st['config']}")
    print(f"  socket:       {st['socket']}")
    print(f"  state:        {st['state']}")
    print(f"  docker:       {st['docker']}")
    print(f"  declarations: {d['tasks']} tasks, {d['images']} images from {d['directory']}")
    print(f"  active runs:  {', '.join(map(str, st['active_runs'])) or 'none'}")
    net, probe = st["network"], st["network"]["last_probe"]
    print(f"  network:      {'rules in place' if not net['problems'] else 'RULES NOT IN PLACE'}"
          + (f", last probe {'passed' if probe['passed'] else 'FAILED'}" if probe else ""))
    for message in d["errors"].values():
        print(f"  REFUSED: {printable(message)}")
    for message in d["warnings"]:
        print(f"  warning: {printable(message)}")
    return 2 if d["errors"] else 0


def _tasks(client: Client, args: argparse.Namespace) -> int:
    tasks = client.call("tasks")
    if args.json:
        _print_json(tasks)
        return 0
    if not tasks:
        print("no tasks declared (put *.yml files in the declarations directory, "
              "then efci reload)")
        return 0
    _table([[t["name"], t["owner"], t["image"], str(len(t["repositories"])), t["source"]]
            for t in tasks], ["TASK", "OWNER", "IMAGE", "REPOS", "DECLARED AT"])
    return 0


def _reload(client: Client, args: argparse.Namespace) -> int:
    result = client.call("reload")
    if args.json:
        _print_json(result)
    else:
        print(f"loaded {result['tasks']} tasks and {result['images']} images "
              f"from {result['directory']}")
        for message in result["errors"].values():
            print(f"REFUSED: {printable(message)}", file=sys.stderr)
        for message in result["warnings"]:
            print(f"warning: {printable(message)}", file=sys.stderr)
    return 2 if result["errors"] else 0


class LogPrinter:
    """Prints a log's records as they arrive: output bytes to stdout exactly,
    the agent's messages to stderr (so stdout redirects byte for byte).
    ``raw`` prints output bytes only; ``timestamps`` prefixes each line with
    the time of the record it starts in; ``as_json`` prints a JSON line per
    record (payload in base64) for scripts."""

    def __init__(self, *, raw: bool = False, timestamps: bool = False, as_json: bool = False,
                 stream: str | None = None) -> None:
        self.raw, self.timestamps, self.as_json = raw, timestamps, as_json
        self.only_stream = stream
        self.streams: dict[int, str] = {}
        self._at_line_start = True
        self._out = sys.stdout.buffer

    def __call__(self, message: dict[str, Any]) -> None:
        from .logformat import Kind
        from .protocol import decode_records

        if message["event"] == "streams":
            self.streams = {v: k for k, v in message["streams"].items()}
            return
        if message["event"] != "records":
            return
        for record in decode_records(message):
            if self.as_json:
                self._json(record)
            elif record.kind is Kind.OUTPUT:
                if self.only_stream in (None, self.streams.get(record.stream)):
                    self._output(record.payload, record.time_ns)
            elif record.kind in (Kind.AGENT, Kind.GAP) and not self.raw:
                text = record.payload.decode("utf-8", "replace") if record.kind is Kind.AGENT \
                    else record.json()["message"]
                self._out.flush()
                print(f"efci: {printable(text)}", file=sys.stderr, flush=True)
        self._out.flush()

    def _output(self, data: bytes, time_ns: int) -> None:
        if not self.timestamps:
            self._out.write(data)
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time_ns / 1e9))
        prefix = f"{stamp}.{time_ns % 1_000_000_000 // 1_000_000:03d} ".encode()
        for line in data.splitlines(keepends=True):
            if self._at_line_start:
                self._out.write(prefix)
            self._out.write(line)
            self._at_line_start = line.endswith(b"\n")

    def _json(self, record: Any) -> None:
        import base64

        print(json.dumps({"position": record.position, "kind": record.kind.name.lower(),
                          "stream": self.streams.get(record.stream, str(record.stream)),
                          "time_ns": record.time_ns,
                          "data": base64.b64encode(record.payload).decode()}), flush=True)


def _run(client: Client, args: argparse.Namespace) -> int:
    return _start_run(client, args, "run", {"task": args.task}, args.task)


def _start_run(client: Client, args: argparse.Namespace, op: str, request: dict[str, Any],
               what: str) -> int:
    if not args.follow:
        run = client.call(op, request)
        if args.json:
            _print_json(run)
        else:
            print(f"run {run['id']} ({what}) queued; "
                  f"follow it with: efci logs --follow {run['id']}")
        return 0

    # The log's own agent messages say when it was queued, started and ended.
    run = client.call(op, {**request, "follow": True}, on_event=LogPrinter(as_json=args.json))
    if args.json:  # JSON lines: the records, then the run
        print(json.dumps(run))
    if run["exit_code"] is not None and run["status"] in ("succeeded", "failed"):
        return int(run["exit_code"])
    return 0 if run["status"] == "succeeded" else EXIT_BY_STATUS.get(run["status"], 1)


def _runs(client: Client, args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"limit": args.limit}
    if args.task:
        request["task"] = args.task
    runs = client.call("runs", request)
    if args.json:
        _print_json(runs)
        return 0
    _table([[str(r["id"]), r["task"], r["status"],
             "-" if r["exit_code"] is None else str(r["exit_code"]),
             _when(r["created_at"]), _duration(r), _progress(r)] for r in runs],
           ["RUN", "TASK", "STATUS", "EXIT", "CREATED", "TOOK", "PROGRESS"])
    return 0


def _show(client: Client, args: argparse.Namespace) -> int:
    run = client.call("show", {"run": args.run})
    if args.json:
        _print_json(run)
        return 0
    for key in ("id", "task", "owner", "status", "exit_code", "error", "attempts", "image",
                "image_id", "container_name", "container_id", "log_size"):
        print(printable(f"{key + ':':16}{'-' if run.get(key) is None else run[key]}"))
    for key in ("created_at", "started_at", "finished_at"):
        print(f"{key + ':':16}{_when(run[key])}")
    for w in run["worktrees"]:
        how = "reused" if w["reused"] else "checked out"
        print(f"{'worktree:':16}/src/{w['mount_name']} {w['commit_sha'][:12]} ({how}, "
              f"{w['volume']})")
    print(f"{'took:':16}{_duration(run)}")
    if run["removed_at"]:
        print(f"{'removed:':16}{_when(run['removed_at'])} (container and mutations)")
    if run["progress"] is not None or run["progress_message"]:
        print(f"{'progress:':16}{_progress(run)}")
    print(f"{'requested by:':16}uid {run['requested_uid']} gid {run['requested_gid']} "
          f"pid {run['requested_pid']}")
    return 0


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
    printer = LogPrinter(raw=args.raw, timestamps=args.timestamps, as_json=args.json,
                         stream=args.stream)
    result = client.call("logs", request, on_event=printer)
    if args.json:  # JSON lines: the records, then where to resume
        print(json.dumps(result))
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    run = client.call("cancel", {"run": args.run})
    if args.json:
        _print_json(run)
    else:
        print(f"run {run['id']} {run['status']}")
    return 0


def _images(client: Client, args: argparse.Namespace) -> int:
    images = client.call("images")
    if args.json:
        _print_json(images)
    else:
        _table([[i["name"], i["tag"] or "-", "yes" if i["built"] else "no",
                 ", ".join(i["used_by"]) or "-", i["source"]] for i in images],
               ["IMAGE", "TAG", "BUILT", "USED BY", "DECLARED AT"])
        for i in images:
            if i.get("error"):
                print(f"efci: {printable(i['error'])}", file=sys.stderr)
    return 0


def _restart(client: Client, args: argparse.Namespace) -> int:
    return _start_run(client, args, "restart", {"run": args.run}, f"run {args.run}")


def _rm(client: Client, args: argparse.Namespace) -> int:
    run = client.call("rm", {"run": args.run})
    if args.json:
        _print_json(run)
    else:
        print(f"run {run['id']}: container and mutations removed; its log and record stay")
    return 0


def _firewall(client: Client, args: argparse.Namespace) -> int:
    result = client.call(f"firewall_{args.action}")
    if args.json:
        _print_json(result)
        return 0
    if args.action == "probe":
        print(f"probe {'passed' if result['passed'] else 'FAILED'}: {result['detail']}")
        return 0 if result["passed"] else 1
    if args.action == "remove":
        print(f"rules of {result['bridge']} removed; the next run on the bridge puts them back "
              "(stop the agent to keep them off)")
        return 0
    print(f"network {result['network']} on {result['bridge']} ({result['subnet']})")
    for problem in result["problems"]:
        print(f"  NOT IN PLACE: {problem}")
    if not result["problems"]:
        print("  rules: all in place")
    probe = result["last_probe"]
    if probe:
        print(f"  last probe: {'passed' if probe['passed'] else 'FAILED'} at {_when(probe['at'])}"
              f" ({probe['detail']})")
    else:
        print("  last probe: none yet")
    for chain, lines in result["rules"].items():
        print(f"  {chain}:")
        for line in lines:
            print(f"    {line}")
    return 1 if result["problems"] or (probe and not probe["passed"]) else 0


def _image(client: Client, args: argparse.Namespace) -> int:
    return _start_run(client, args, "image_build", {"name": args.name}, f"image {args.name}")


def _print_key(key: dict[str, Any]) -> None:
    used = ", ".join(key["used_by"]) or "no declared task"
    print(f"# {key['owner']}/{key['name']}  {key['fingerprint']}  used by {used}")
    print(key["public_key"])


def _key(client: Client, args: argparse.Namespace) -> int:
    owner = {"owner": args.owner} if args.owner else {}
    if args.action == "list":
        keys = client.call("key_list", owner)
        if args.json:
            _print_json(keys)
        else:
            _table([[k["owner"], k["name"], k["fingerprint"], ", ".join(k["used_by"]) or "-"]
                    for k in keys], ["OWNER", "KEY", "FINGERPRINT", "USED BY"])
        return 0
    if args.action == "trust":
        request: dict[str, Any] = {"host": args.host, "port": args.port, **owner}
        if args.keys:
            request["keys"] = (sys.stdin.read() if str(args.keys) == "-"
                               else args.keys.read_text())
        result = client.call("key_trust", request)
        if args.json:
            _print_json(result)
        else:
            how = "as read by ssh-keyscan just now" if result["scanned"] else "as given"
            print(f"pinned for {result['owner']}, {how}; compare with the server's own:")
            for line in result["fingerprints"]:
                print(f"  {line}")
        return 0
    request = {"name": args.name, **owner}
    if args.action == "delete":
        result = client.call("key_delete", {**request, "force": args.force})
        if args.json:
            _print_json(result)
        else:
            print(f"deleted key {result['owner']}/{result['name']}")
        return 0
    key = client.call(f"key_{args.action}", request)
    if args.json:
        _print_json(key)
    else:
        _print_key(key)
        if args.action == "create":
            print("\nAdd the line above to the repository in Gitea as a read-only deploy key "
                  "(Settings > Deploy Keys).", file=sys.stderr)
    return 0


COMMANDS = {
    "status": _status, "tasks": _tasks, "reload": _reload, "run": _run, "runs": _runs,
    "show": _show, "logs": _logs, "cancel": _cancel, "key": _key, "images": _images,
    "image": _image, "restart": _restart, "rm": _rm, "firewall": _firewall,
}
