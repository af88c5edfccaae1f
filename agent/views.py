"""What ``efci`` shows people: one view per answer of the agent.

Each view takes an operation's result (the very data ``--json`` prints)
and prints it for a person, returning the exit status.  Text that came from
the agent is made printable first (a declaration's escape sequence never
reaches the terminal).
"""

from __future__ import annotations

import json
import sys
import time

from .errors import printable
from .names import human_size as size
from .wire import Kind

TYPE_CHECKING = False  # see cli: a client command imports little
if TYPE_CHECKING:
    from typing import Any


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def duration(run: dict[str, Any]) -> str:
    start, end = run.get("started_at"), run.get("finished_at")
    if not start:
        return "-"
    return f"{(end or time.time()) - start:.1f}s"


def progress(run: dict[str, Any]) -> str:
    parts = []
    if run.get("progress") is not None:
        parts.append(f"{run['progress'] * 100:.0f}%")
    if run.get("progress_message"):
        parts.append(run["progress_message"])
    return printable(" ".join(parts)) or "-"


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(printable("  ".join(str(v).ljust(w)
                                  for v, w in zip(row, widths, strict=True)).rstrip()))


def status(st: dict[str, Any]) -> int:
    d = st["declarations"]
    print(f"efforting-ci {st['version']} (pid {st['pid']}), up since {when(st['started_at'])}")
    print(f"  config:       {st['config']}")
    print(f"  socket:       {st['socket']}")
    print(f"  state:        {st['state']}")
    print(f"  docker:       {st['docker']}")
    print(f"  declarations: {d['tasks']} tasks, {d['images']} images from {d['directory']}")
    running = [r for r in st["active_runs"] if r not in st["queued_runs"]]
    print(f"  runs:         {len(running)} active (at most {st['max_parallel']} at once)"
          + (f": {', '.join(map(str, running))}" if running else "")
          + (f"; {len(st['queued_runs'])} queued" if st["queued_runs"] else ""))
    net, probe = st["network"], st["network"]["last_probe"]
    print(f"  network:      {'rules in place' if not net['problems'] else 'RULES NOT IN PLACE'}"
          + (f", last probe {'passed' if probe['passed'] else 'FAILED'}" if probe else ""))
    print(f"  agent:        {size(st['memory'])} of memory, {st['open_files']} open files")
    for name, disk in st["disks"].items():
        print(f"  free space:   {size(disk['free'])} of {size(disk['total'])} for {name} "
              f"({disk['path']})" + (" LOW" if disk["free"] < disk["low_water"] else ""))
    if st["short_of_space"]:
        print("  WAITING:      queued runs wait for free space: "
              + "; ".join(st["short_of_space"]))
    web = st.get("web")
    print(f"  web page:     {web['url']} (pid {web['pid']}); log in with efci web-login" if web
          else "  web page:     not running (systemctl start efforting-ci-web, or efci web)")
    for message in d["errors"].values():
        print(f"  REFUSED: {printable(message)}")
    for message in d["warnings"]:
        print(f"  warning: {printable(message)}")
    return 2 if d["errors"] else 0


def web_login(answer: dict[str, Any]) -> int:
    print(answer["url"])
    print(f"Open it in a browser before {when(answer['expires_at'])}; it works once. "
          "Anyone with it can log in: do not paste it where others read.", file=sys.stderr)
    if not answer["web_up"]:
        print("note: the web page is not running (systemctl start efforting-ci-web)",
              file=sys.stderr)
    return 0


def web_logout(answer: dict[str, Any]) -> int:
    print(f"ended {answer['revoked']} web session(s) and login URL(s)")
    return 0


def tasks(found: list[dict[str, Any]]) -> int:
    if not found:
        print("no tasks declared (put *.yml files in the declarations directory, "
              "then efci reload)")
        return 0
    table([[t["name"], t["owner"], t["image"], str(len(t["repositories"])), t["source"]]
           for t in found], ["TASK", "OWNER", "IMAGE", "REPOS", "DECLARED AT"])
    return 0


def reload(result: dict[str, Any]) -> int:
    print(f"loaded {result['tasks']} tasks and {result['images']} images "
          f"from {result['directory']}")
    for message in result["errors"].values():
        print(f"REFUSED: {printable(message)}", file=sys.stderr)
    for message in result["warnings"]:
        print(f"warning: {printable(message)}", file=sys.stderr)
    return 2 if result["errors"] else 0


def queued(run: dict[str, Any]) -> int:
    print(f"run {run['id']} ({run['task']}) queued; "
          f"follow it with: efci logs --follow {run['id']}")
    return 0


def runs(found: list[dict[str, Any]]) -> int:
    table([[str(r["id"]), r["task"], r["status"] + (
                f" #{r['queue_position']}" if r.get("queue_position") else ""),
            "-" if r["exit_code"] is None else str(r["exit_code"]),
            when(r["created_at"]), duration(r), short_trigger(r["trigger"]), progress(r)]
           for r in found],
          ["RUN", "TASK", "STATUS", "EXIT", "CREATED", "TOOK", "BY", "PROGRESS"])
    return 0


def short_trigger(t: dict[str, Any]) -> str:
    """``push main 1a2b3c4d5e6f`` or ``uid 1000``, for a table."""
    if t.get("kind") == "push":
        return printable(f"push {t['ref'].removeprefix('refs/heads/')} {t['after'][:12]}")
    return f"uid {t.get('uid')}"


def show(run: dict[str, Any]) -> int:
    for key in ("id", "task", "owner", "status", "queue_position", "exit_code", "error",
                "attempts", "image", "image_id", "container_name", "container_id", "log_size"):
        if key == "queue_position" and run.get(key) is None:
            continue
        print(printable(f"{key + ':':16}{'-' if run.get(key) is None else run[key]}"))
    for key in ("created_at", "started_at", "finished_at"):
        print(f"{key + ':':16}{when(run[key])}")
    for w in run["worktrees"]:
        how = "reused" if w["reused"] else "checked out"
        print(f"{'worktree:':16}/src/{w['mount_name']} {w['commit_sha'][:12]} ({how}, "
              f"{w['volume']})")
    for st in run.get("stages", []):
        took = (f", {st['finished_at'] - st['started_at']:.1f}s"
                if st["started_at"] and st["finished_at"] else "")
        code = f", exit status {st['exit_code']}" if st["exit_code"] is not None else ""
        print(printable(f"{'stage:':16}{st['name']}: {st['status']}{code}{took}"
                        + (f" ({st['container']})" if st["container"] else "")
                        + (f": {st['error']}" if st["error"] else "")
                        + (f"; attempt {st['patched_attempt']} on what efci shell left"
                           if st.get("patched_attempt") else "")))
    if run.get("patched_attempt"):
        print(f"{'patched:':16}attempt {run['patched_attempt']} on what efci shell left")
    print(f"{'took:':16}{duration(run)}")
    if run.get("timings"):
        print("where the time went (monotonic clock; parts indented under their phase):")
        for depth, phase in phase_tree(run["timings"]):
            name = "  " * (depth + 1) + phase["phase"]
            print(printable(f"{name:34}{phase['seconds'] * 1000:10.1f} ms"))
    if run["removed_at"]:
        print(printable(f"{'removed:':16}{when(run['removed_at'])} (container and layers)"
                        + (f"; {run['removed_why']}" if run.get("removed_why") else "")))
    if run.get("log_removed_at"):
        print(f"{'log removed:':16}{when(run['log_removed_at'])} (gc.logs_keep)")
    if run["progress"] is not None or run["progress_message"]:
        print(f"{'progress:':16}{progress(run)}")
    print(f"{'requested by:':16}uid {run['requested_uid']} gid {run['requested_gid']} "
          f"pid {run['requested_pid']}")
    print(printable(f"{'trigger:':16}{trigger(run['trigger'])}"))
    for st in run.get("commit_statuses", []):
        if st["superseded"]:
            continue
        fate = (f"delivered {when(st['delivered_at'])}" if st["delivered_at"] else
                f"not delivered yet ({st['attempts']} tries; last: {st['last_error']})"
                if st["attempts"] else "queued")
        print(printable(f"{'commit status:':16}{st['state']} on {st['sha'][:12]} "
                        f"({st['context']}): {fate}"))
    return 0


def phase_tree(phases: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Each phase (in the order they began) with how deep it is among the
    phases it is part of."""
    open_: list[str] = []
    found = []
    for phase in phases:
        while open_ and open_[-1] != phase["within"]:
            open_.pop()
        found.append((len(open_), phase))
        open_.append(phase["phase"])
    return found


def trigger(t: dict[str, Any]) -> str:
    if t.get("kind") == "push":
        return (f"push of {t['ref']} to {t['repository']} by {t['pusher']}: "
                f"{t['before'][:12]}..{t['after'][:12]} (delivery {t['delivery']})")
    return f"by hand (uid {t.get('uid')})"


def cancelled(run: dict[str, Any]) -> int:
    print(f"run {run['id']} {run['status']}")
    return 0


def removed(run: dict[str, Any]) -> int:
    print(f"run {run['id']}: container and layers removed; its log and record stay")
    return 0


def images(found: list[dict[str, Any]]) -> int:
    table([[i["name"], i["tag"] or "-", "yes" if i["built"] else "no",
            ", ".join(i["used_by"]) or "-", i["source"]] for i in found],
          ["IMAGE", "TAG", "BUILT", "USED BY", "DECLARED AT"])
    for i in found:
        if i.get("error"):
            print(f"efci: {printable(i['error'])}", file=sys.stderr)
    return 0


def firewall_status(result: dict[str, Any]) -> int:
    print(f"network {result['network']} on {result['bridge']} ({result['subnet']})")
    for problem in result["problems"]:
        print(f"  NOT IN PLACE: {problem}")
    if not result["problems"]:
        print("  rules: all in place")
    probe = result["last_probe"]
    if probe:
        print(f"  last probe: {'passed' if probe['passed'] else 'FAILED'} at {when(probe['at'])}"
              f" ({printable(probe['detail'])})")
    else:
        print("  last probe: none yet")
    for chain, lines in result["rules"].items():
        print(f"  {chain}:")
        for line in lines:
            print(f"    {line}")
    return 1 if result["problems"] or (probe and not probe["passed"]) else 0


def firewall_probe(result: dict[str, Any]) -> int:
    print(f"probe {'passed' if result['passed'] else 'FAILED'}: {printable(result['detail'])}")
    return 0 if result["passed"] else 1


def firewall_remove(result: dict[str, Any]) -> int:
    print(f"rules of {result['bridge']} removed; the next run on the bridge puts them back "
          "(stop the agent to keep them off)")
    return 0


def key(found: dict[str, Any]) -> int:
    used = ", ".join(found["used_by"]) or "no declared task"
    print(f"# {found['owner']}/{found['name']}  {found['fingerprint']}  used by {used}")
    for r in found["registered"]:
        print(f"# a read-only deploy key of {r['repo']} on Gitea (key {r['gitea_id']}, "
              f"since {when(r['registered_at'])})")
    print(found["public_key"])
    return 0


def key_registered(result: dict[str, Any]) -> int:
    what = "is now" if result["added"] else "already was"
    access = "read-only" if result["read_only"] else "READ-WRITE (change it in Gitea)"
    print(f"{result['owner']}/{result['name']} {what} a {access} deploy key of "
          f"{result['repo']} on Gitea (key {result['gitea_id']})")
    return 0


def collected(result: dict[str, Any]) -> int:
    verb = "would remove" if result["dry_run"] else "removed"
    for r in result["removed"]:
        print(printable(f"{verb} {r['kind']} {r['name']}: {r['why']} ({size(r['bytes'])})"))
    print(f"{len(result['removed'])} removals, {size(result['bytes'])}"
          + (" (a dry run: nothing was removed)" if result["dry_run"] else " freed"))
    return 0


def caches(listing: dict[str, Any]) -> int:
    if listing["problem"]:
        print(f"caches are not available: {listing['problem']}", file=sys.stderr)
    if listing["usage_inconsistent"]:
        print("the kernel marked the usage figures inconsistent; a rescan is under way, ask "
              "again in a moment", file=sys.stderr)
    rows = []
    for c in listing["caches"]:
        claims = ", ".join(
            k["task"] + ("" if k["released_at"] is None else " (released)") for k in c["claims"])
        kind = ("shared" if c["shared"] else "private") + (
            f", layered gen {c['generation']}" if c["layered"] else "")
        state = ("in use by run " + ", ".join(map(str, c["used_by_runs"]))
                 if c["used_by_runs"] else
                 f"removal {'due' if c['removal_due'] else 'after ' + when(c['removal_at'])}"
                 if c["removal_at"] else "")
        rows.append([f"{c['owner']}/{c['name']}", kind, claims or "-", size(c["quota"]),
                     size(c["referenced"]), size(c["exclusive"]),
                     ", ".join(f"{t} {size(b)}" for t, b in c["apportioned"].items()) or "-",
                     when(c["last_used_at"]) if c["last_used_at"] else "never", state])
    table(rows, ["CACHE", "KIND", "CLAIMED BY", "QUOTA", "REFERENCED", "EXCLUSIVE",
                 "APPORTIONED", "LAST USED", "NOW"])
    return 0


def cache_quota(result: dict[str, Any]) -> int:
    print(f"cache {result['owner']}/{result['name']}: quota {size(result['quota'])}")
    return 0


def cache_removed(result: dict[str, Any]) -> int:
    print(f"removed cache {result['owner']}/{result['name']}")
    return 0


def cache_released(result: dict[str, Any]) -> int:
    if result["removed"]:
        print(f"cache {result['owner']}/{result['name']} released by {result['task']}, its "
              "last claim: removed")
    else:
        print(f"cache {result['owner']}/{result['name']} released by {result['task']}; still "
              f"claimed by {', '.join(result['still_claimed_by'])}")
    return 0


def cache_promoted(result: dict[str, Any]) -> int:
    print(f"cache {result['owner']}/{result['name']}: run {result['run']}'s view is now "
          f"generation {result['generation']}")
    return 0


def gitea_check(report: dict[str, Any]) -> int:
    user = report["user"]
    print(f"Gitea {report['version'] or '(version not said)'} answers at {report['api']}")
    print(f"the token is {user}'s" if user else
          "the token is accepted; whose it is needs the read:user scope")
    if not report["repositories"]:
        print("no declared task checks out a repository on this Gitea")
    yes = {True: "yes", False: "no"}
    rows = [[repo, yes[r["found"]], yes[r["read"]], yes[r["statuses"]], yes[r["deploy_keys"]]]
            for repo, r in report["repositories"].items()]
    if rows:
        table(rows, ["REPOSITORY", "FOUND", "LITERAL SHAS", "COMMIT STATUSES", "DEPLOY KEYS"])
    missing = [repo for repo, r in report["repositories"].items()
               if not (r["read"] and r["statuses"])]
    for repo in missing:
        print(f"the token's user needs write access to {repo} for its commit statuses",
              file=sys.stderr)
    return 1 if missing else 0


def key_created(found: dict[str, Any]) -> int:
    key(found)
    print("\nAdd the line above to the repository in Gitea as a read-only deploy key "
          "(Settings > Deploy Keys).", file=sys.stderr)
    return 0


def keys(found: list[dict[str, Any]]) -> int:
    table([[k["owner"], k["name"], k["fingerprint"], ", ".join(k["used_by"]) or "-"]
           for k in found], ["OWNER", "KEY", "FINGERPRINT", "USED BY"])
    return 0


def key_deleted(result: dict[str, Any]) -> int:
    print(f"deleted key {result['owner']}/{result['name']}")
    for repo in result["still_on_gitea"]:
        print(f"its public half is still a deploy key of {repo} on Gitea; remove it there "
              "(Settings > Deploy Keys)", file=sys.stderr)
    return 0


def trusted(result: dict[str, Any]) -> int:
    how = "as read by ssh-keyscan just now" if result["scanned"] else "as given"
    print(f"pinned for {result['owner']}, {how}; compare with the server's own:")
    for line in result["fingerprints"]:
        print(f"  {line}")
    return 0


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
        if message["event"] == "output":  # raw, already chosen by the agent
            if "payload" in message:
                self.output(message["payload"])
            self._out.flush()
            return
        if message["event"] == "streams":
            self.streams = {v: k for k, v in message["streams"].items()}
            return
        if message["event"] != "records":
            return
        at = 0
        with memoryview(message["payload"]) as blob:  # no record objects: a client starts faster
            for position, kind, stream, time_ns, length in message["records"]:
                payload = blob[at:at + length]
                at += length
                if self.as_json:
                    self._json(position, kind, stream, time_ns, payload)
                elif kind == Kind.OUTPUT:
                    if self.only_stream in (None, self.streams.get(stream)):
                        self._output(payload, time_ns)
                elif kind in (Kind.AGENT, Kind.GAP) and not self.raw:
                    text = str(payload, "utf-8", "replace") if kind == Kind.AGENT \
                        else json.loads(bytes(payload))["message"]
                    self._out.flush()
                    print(f"efci: {printable(text)}", file=sys.stderr, flush=True)
        self._out.flush()

    def output(self, data: memoryview | bytearray) -> None:
        """Raw output, as it arrives (``efci logs --raw``)."""
        self._out.write(data)

    def _output(self, data: memoryview, time_ns: int) -> None:
        if not self.timestamps:
            self._out.write(data)
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time_ns / 1e9))
        prefix = f"{stamp}.{time_ns % 1_000_000_000 // 1_000_000:03d} ".encode()
        for line in bytes(data).splitlines(keepends=True):
            if self._at_line_start:
                self._out.write(prefix)
            self._out.write(line)
            self._at_line_start = line.endswith(b"\n")

    def _json(self, position: int, kind: int, stream: int, time_ns: int,
              payload: memoryview) -> None:
        import base64

        print(json.dumps({"position": position, "kind": Kind(kind).name.lower(),
                          "stream": self.streams.get(stream, str(stream)), "time_ns": time_ns,
                          "data": base64.b64encode(payload).decode()}), flush=True)


