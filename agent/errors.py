"""The agent's error classes: each knows its message, its protocol code and
the exit status `efci` returns for it (borg's habit), so a failure reads the
same in the daemon's log, over the socket and at the shell."""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: control characters and escape
    sequences (from a declaration, a file name, a program's output) are
    written as ``\\xNN`` / ``\\uNNNN``; newlines and tabs stay."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


class EfciError(Exception):
    """Base of every error the agent reports to a person on purpose.  Its
    message is made printable here, once, for the log, the socket and the
    terminal alike."""

    code = "error"
    exit_status = 1

    def __init__(self, message: str) -> None:
        message = printable(message)
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class ConfigError(EfciError):
    """A file the administrator wrote is wrong: says file, line and field."""

    code = "config"
    exit_status = 78  # EX_CONFIG

    def __init__(self, file: str, line: int, field: str, problem: str) -> None:
        where = file + (f":{line}" if line else "")
        super().__init__(f"{where}: {field + ': ' if field else ''}{problem}")
        self.file, self.line, self.field, self.problem = file, line, field, problem

    def to_wire(self) -> dict[str, object]:
        return {**super().to_wire(), "file": self.file, "line": self.line, "field": self.field}


class RequestError(EfciError):
    """A control-socket request is malformed or asks for something invalid."""

    code = "bad_request"
    exit_status = 64  # EX_USAGE


class NotFound(EfciError):
    code = "not_found"
    exit_status = 66  # EX_NOINPUT


class Conflict(EfciError):
    """The request is valid but the thing is in the wrong state for it."""

    code = "conflict"
    exit_status = 75  # EX_TEMPFAIL


class Refused(EfciError):
    """A credential (a web login or session) is unknown, used up or expired."""

    code = "refused"
    exit_status = 77  # EX_NOPERM


class RunFailed(EfciError):
    """A run cannot go on for a reason of its own (a checkout or build that
    failed, a refused deploy target): recorded as the run's result, failed,
    not as a fault of the agent."""

    code = "run_failed"


class AgentUnreachable(EfciError):
    code = "unreachable"
    exit_status = 69  # EX_UNAVAILABLE


class CommandFailed(EfciError):
    """A host program (docker, git, ...) failed: shows the command, its exit
    status and its indented output, which is what an operator needs to act."""

    code = "command_failed"

    def __init__(self, argv: list[str], returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.argv, self.returncode = argv, returncode
        self.stdout, self.stderr = stdout, stderr
        parts = [f"command failed with exit status {returncode}: {' '.join(argv)}"]
        for name, data in (("stdout", stdout), ("stderr", stderr)):
            text = data.decode("utf-8", "replace").strip()
            if text:
                indented = "\n".join("    " + line for line in text.splitlines()[-20:])
                parts.append(f"  {name}:\n{indented}")
        super().__init__("\n".join(parts))

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


def internal_error(e: BaseException) -> EfciError:
    """What a person is told of an exception nobody expected: a sentence,
    not a Python repr; the traceback is in the agent's log."""
    detail = str(e).splitlines()[0][:200] if str(e) else ""
    return EfciError(f"the agent failed unexpectedly ({type(e).__name__}"
                     + (f": {detail}" if detail else "") + "); this is a bug in efforting-ci: "
                     "the details are in the agent's log (journalctl -u efforting-ci)")
