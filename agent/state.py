"""The state store: SQLite in WAL mode under the state directory.

Every change a crash must not lose is committed before the agent acts on it
(a run is recorded *queued* before its container exists, and its container
id before the container starts), so recovery can find and finish it.

The schema is versioned with ``PRAGMA user_version`` and migrated forward
on open; a database newer than this code is refused rather than guessed at.
Methods are synchronous and quick; the daemon calls them through
:meth:`StateStore.call`, one at a time in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from .errors import EfciError
from .model import Requester, RunStatus, Task

T = TypeVar("T")

# Each entry moves the schema from version i to i+1; never edit a shipped one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task TEXT NOT NULL,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        exit_code INTEGER,
        error TEXT,
        requested_uid INTEGER NOT NULL,
        requested_gid INTEGER NOT NULL,
        requested_pid INTEGER NOT NULL,
        image TEXT NOT NULL,
        image_id TEXT,
        container_name TEXT,
        container_id TEXT,
        declaration TEXT NOT NULL
    );
    CREATE INDEX runs_by_task ON runs (task, id);
    CREATE INDEX runs_unfinished ON runs (status) WHERE status IN ('queued', 'running');
    """,
    """
    CREATE TABLE worktrees (
        volume TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        entry TEXT NOT NULL,
        commit_sha TEXT,
        ready INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE TABLE run_worktrees (
        run_id INTEGER NOT NULL REFERENCES runs (id),
        volume TEXT NOT NULL,
        mount_name TEXT NOT NULL,
        commit_sha TEXT NOT NULL,
        reused INTEGER NOT NULL,
        PRIMARY KEY (run_id, volume)
    );
    """,
    """
    ALTER TABLE runs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE runs ADD COLUMN removed_at REAL;
    ALTER TABLE runs ADD COLUMN progress REAL;
    ALTER TABLE runs ADD COLUMN progress_message TEXT;
    """,
    """
    CREATE TABLE web_tokens (
        digest TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        uid INTEGER NOT NULL,
        csrf TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX runs_by_owner ON runs (owner, id);
    CREATE INDEX runs_by_status ON runs (status, id);
    """,
    """
    ALTER TABLE runs ADD COLUMN trigger TEXT;
    CREATE TABLE deliveries (id TEXT PRIMARY KEY, received_at REAL NOT NULL);
    """,
    """
    CREATE TABLE statuses (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER NOT NULL REFERENCES runs (id),
        repo TEXT NOT NULL,
        sha TEXT NOT NULL,
        state TEXT NOT NULL,
        context TEXT NOT NULL,
        target_url TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at REAL NOT NULL,
        next_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        delivered_at REAL,
        superseded INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX statuses_due ON statuses (next_at) WHERE delivered_at IS NULL AND superseded = 0;
    """,
    """
    CREATE TABLE key_registrations (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        repo TEXT NOT NULL,
        gitea_id INTEGER NOT NULL,
        registered_at REAL NOT NULL,
        PRIMARY KEY (owner, name, repo)
    );
    """,
    """
    CREATE TABLE caches (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        shared INTEGER NOT NULL,
        layered INTEGER NOT NULL,
        declared_quota INTEGER,
        quota INTEGER,
        generation INTEGER NOT NULL DEFAULT 0,
        made INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        last_used_at REAL,
        UNIQUE (owner, name)
    );
    CREATE TABLE cache_claims (
        cache_id INTEGER NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
        task TEXT NOT NULL,
        source TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        released_at REAL,
        released_how TEXT,
        PRIMARY KEY (cache_id, task)
    );
    CREATE TABLE run_caches (
        run_id INTEGER NOT NULL REFERENCES runs (id),
        cache_id INTEGER NOT NULL,
        generation INTEGER NOT NULL,
        PRIMARY KEY (run_id, cache_id)
    );
    """,
    """
    CREATE TABLE run_stages (
        run_id INTEGER NOT NULL REFERENCES runs (id),
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at REAL,
        finished_at REAL,
        exit_code INTEGER,
        container TEXT,
        error TEXT,
        PRIMARY KEY (run_id, idx)
    );
    """,
    """
    ALTER TABLE runs ADD COLUMN removed_why TEXT;
    ALTER TABLE runs ADD COLUMN log_removed_at REAL;
    ALTER TABLE runs ADD COLUMN patched_attempt INTEGER;
    """,
    """
    ALTER TABLE run_stages ADD COLUMN patched_attempt INTEGER;
    """,
    """
    ALTER TABLE runs ADD COLUMN queued TEXT;
    """,
    """
    ALTER TABLE runs ADD COLUMN timings TEXT;
    """,
)


class SchemaTooNew(Exception):
    pass


class StateUnwritable(EfciError):
    code = "state_unwritable"
    exit_status = 75  # EX_TEMPFAIL: the same request may work later

    def __init__(self, path: Path, error: sqlite3.Error) -> None:
        full = "full" in str(error)
        super().__init__(f"the state store {path} cannot be used ({error})"
                         + ("; free space on its filesystem, then try again" if full
                            else "; see the agent's log"))


@dataclass(frozen=True)
class RunRecord:
    id: int
    task: str
    owner: str
    status: RunStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    error: str | None
    requested_uid: int
    requested_gid: int
    requested_pid: int
    image: str
    image_id: str | None
    container_name: str | None
    container_id: str | None
    attempts: int
    removed_at: float | None
    progress: float | None
    progress_message: str | None
    trigger: str | None  # JSON: what started it (a push; None: by hand)
    removed_why: str | None  # efci rm by whom, or what gc policy evicted it
    log_removed_at: float | None  # gc removed its log (the record stays)
    patched_attempt: int | None  # the attempt that runs on what efci shell left
    queued: str | None  # JSON: how to start it, while it waits for its turn (runs.py)
    timings: str | None  # JSON: where its last attempt's time went (agent/timings.py)

    def to_wire(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.__dict__.items() if k != "queued"}
        return {**fields, "status": self.status.value,
                "timings": json.loads(self.timings) if self.timings else [],
                "trigger": json.loads(self.trigger) if self.trigger else
                {"kind": "manual", "uid": self.requested_uid}}


_RUN_COLUMNS = ", ".join(RunRecord.__dataclass_fields__)
# What update_run, update_stage and update_cache may set.
RUN_FIELDS = frozenset(RunRecord.__dataclass_fields__) - {"id"}
STAGE_FIELDS = frozenset({"status", "started_at", "finished_at", "exit_code", "container",
                          "error", "patched_attempt"})
CACHE_FIELDS = frozenset({"quota", "generation", "made", "last_used_at"})


def _record(row: sqlite3.Row) -> RunRecord:
    values = dict(row)
    values["status"] = RunStatus(values["status"])
    return RunRecord(**values)


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection, used by one worker thread at a time (the limiter).
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._limiter = trio.CapacityLimiter(1)
        self._migrate()
        os.chmod(path, 0o600)

    def close(self) -> None:
        self._db.close()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one of this store's methods in the worker thread.  SQLite's
        own failures (a full disk above all) become a StateUnwritable that
        says what to do; the transaction was rolled back, so the store
        stays consistent and the same call can be made again later."""
        try:
            return await trio.to_thread.run_sync(partial(fn, *args, **kwargs),
                                                 limiter=self._limiter)
        except sqlite3.Error as e:
            raise StateUnwritable(self.path, e) from e

    # -- schema ------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise SchemaTooNew(
                f"{self.path} has schema version {version}, newer than this efci knows "
                f"({len(MIGRATIONS)}); run the newer efci or restore a backup")
        for target in range(version + 1, len(MIGRATIONS) + 1):
            with self._transaction():
                for statement in MIGRATIONS[target - 1].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {target}")
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('instance', ?)",
                             (secrets.token_hex(4),))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def instance(self) -> str:
        """A random id of this agent's state, used in container names so two
        agents on one host (``--root``) never touch each other's containers."""
        return str(self._db.execute("SELECT value FROM meta WHERE key='instance'").fetchone()[0])

    # -- runs ----------------------------------------------------------------

    def create_run(self, task: Task, requester: Requester, declaration: dict[str, Any],
                   trigger: dict[str, Any] | None = None, queued: str | None = None) -> int:
        with self._transaction():
            cur = self._db.execute(
                "INSERT INTO runs (task, owner, status, created_at, requested_uid,"
                " requested_gid, requested_pid, image, declaration, trigger, queued)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task.name, task.owner, RunStatus.QUEUED.value, time.time(), requester.uid,
                 requester.gid, requester.pid, task.image, json.dumps(declaration),
                 json.dumps(trigger) if trigger else None, queued))
            return int(cur.lastrowid)  # type: ignore[arg-type]

    # -- commit statuses: the outbox -----------------------------------------------

    def add_status(self, run_id: int, repo: str, sha: str, state: str, context: str,
                   target_url: str, description: str) -> None:
        """Queue a status; one not yet delivered of the same run and context
        is superseded (Gitea shows the latest it got: never an old pending)."""
        now = time.time()
        with self._transaction():
            self._db.execute("UPDATE statuses SET superseded = 1 WHERE run_id = ? AND context = ?"
                             " AND delivered_at IS NULL", (run_id, context))
            self._db.execute(
                "INSERT INTO statuses (run_id, repo, sha, state, context, target_url,"
                " description, created_at, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, repo, sha, state, context, target_url, description, now, now))

    def due_statuses(self, now: float) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM statuses WHERE delivered_at IS NULL AND"
                                " superseded = 0 AND next_at <= ? ORDER BY id", (now,))
        return [dict(r) for r in rows]

    def next_status_at(self) -> float | None:
        row = self._db.execute("SELECT min(next_at) FROM statuses WHERE delivered_at IS NULL"
                               " AND superseded = 0").fetchone()
        return float(row[0]) if row[0] is not None else None

    def status_delivered(self, status_id: int) -> None:
        with self._transaction():
            self._db.execute("UPDATE statuses SET delivered_at = ?, attempts = attempts + 1,"
                             " last_error = NULL WHERE id = ?", (time.time(), status_id))

    def status_failed(self, status_id: int, error: str, next_at: float) -> None:
        with self._transaction():
            self._db.execute("UPDATE statuses SET attempts = attempts + 1, last_error = ?,"
                             " next_at = ? WHERE id = ?", (error, next_at, status_id))

    def run_statuses(self, run_id: int) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT state, sha, context, target_url, description, created_at, delivered_at,"
            " attempts, last_error, superseded FROM statuses WHERE run_id = ? ORDER BY id",
            (run_id,))
        return [{**dict(r), "superseded": bool(r["superseded"])} for r in rows]

    # -- deploy keys registered on Gitea ----------------------------------------------

    def add_key_registration(self, owner: str, name: str, fingerprint: str, repo: str,
                             gitea_id: int) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO key_registrations VALUES (?, ?, ?, ?, ?, ?)",
                             (owner, name, fingerprint, repo, gitea_id, time.time()))

    def key_registrations(self, owner: str, name: str, fingerprint: str) -> list[dict[str, Any]]:
        """Where this key (these very bytes: a key made again under the same
        name is not registered anywhere yet) is a deploy key."""
        rows = self._db.execute(
            "SELECT repo, gitea_id, registered_at FROM key_registrations WHERE owner = ? AND"
            " name = ? AND fingerprint = ? ORDER BY repo", (owner, name, fingerprint))
        return [dict(r) for r in rows]

    def drop_key_registrations(self, owner: str, name: str) -> list[str]:
        with self._transaction():
            rows = self._db.execute("DELETE FROM key_registrations WHERE owner = ? AND name = ?"
                                    " RETURNING repo", (owner, name)).fetchall()
        return sorted(r["repo"] for r in rows)

    # -- pipeline stages --------------------------------------------------------------

    def set_stages(self, run_id: int, names: list[str]) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO run_stages (run_id, idx, name, status) VALUES (?, ?, ?,"
                " 'pending')", [(run_id, i, n) for i, n in enumerate(names)])

    def update_stage(self, run_id: int, index: int, **fields: Any) -> None:
        self._update("run_stages", STAGE_FIELDS, fields, "run_id = ? AND idx = ?",
                     (run_id, index))

    def settle_stages(self, run_id: int) -> None:
        """A run that ended while a stage ran: that stage was cancelled, the
        ones after it never ran."""
        with self._transaction():
            self._db.execute("UPDATE run_stages SET status = 'cancelled', finished_at = ? WHERE"
                             " run_id = ? AND status = 'running'", (time.time(), run_id))
            self._db.execute("UPDATE run_stages SET status = 'skipped' WHERE run_id = ? AND"
                             " status = 'pending'", (run_id,))

    def run_stages(self, run_id: int) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM run_stages WHERE run_id = ? ORDER BY idx",
                                (run_id,))
        return [{k: v for k, v in dict(r).items() if k != "run_id"} for r in rows]

    # -- caches -------------------------------------------------------------------------

    def claim_caches(self, claims: list[dict[str, Any]]) -> list[str]:
        """Record what the declarations claim now: each cache (created, or its
        declared settings updated) and each (cache, task) claim, taken again
        if it was released.  A claim no declaration makes any more is released
        (pending removal).  Returns what changed, in words, for the log."""
        now, said = time.time(), []
        with self._transaction():
            wanted = set()
            for c in claims:
                self._db.execute(
                    "INSERT INTO caches (owner, name, shared, layered, declared_quota, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, name) DO UPDATE SET"
                    " shared = excluded.shared, layered = excluded.layered,"
                    " declared_quota = excluded.declared_quota",
                    (c["owner"], c["name"], c["shared"], c["layered"], c["quota"], now))
                cache_id = self._db.execute("SELECT id FROM caches WHERE owner = ? AND name = ?",
                                            (c["owner"], c["name"])).fetchone()[0]
                wanted.add((cache_id, c["task"]))
                cur = self._db.execute(
                    "INSERT INTO cache_claims (cache_id, task, source, claimed_at) VALUES"
                    " (?, ?, ?, ?) ON CONFLICT (cache_id, task) DO UPDATE SET source ="
                    " excluded.source, released_at = NULL, released_how = NULL"
                    " WHERE released_at IS NOT NULL OR source != excluded.source",
                    (cache_id, c["task"], c["source"], now))
                if cur.rowcount:
                    said.append(f"cache {c['owner']}/{c['name']} claimed by {c['task']} "
                                f"({c['source']})")
            for row in self._db.execute("SELECT c.owner, c.name, k.cache_id, k.task FROM"
                                        " cache_claims k JOIN caches c ON c.id = k.cache_id"
                                        " WHERE k.released_at IS NULL").fetchall():
                if (row["cache_id"], row["task"]) not in wanted:
                    self._db.execute(
                        "UPDATE cache_claims SET released_at = ?, released_how = ? WHERE"
                        " cache_id = ? AND task = ?", (now, "no declaration claims it",
                                                       row["cache_id"], row["task"]))
                    said.append(f"cache {row['owner']}/{row['name']}: task {row['task']} no "
                                "longer declares it; released, removal pending")
        return said

    def caches(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM caches ORDER BY owner, name").fetchall()
        claims = self._db.execute("SELECT * FROM cache_claims ORDER BY task").fetchall()
        out = []
        for r in rows:
            out.append({**dict(r), "shared": bool(r["shared"]), "layered": bool(r["layered"]),
                        "made": bool(r["made"]),
                        "claims": [dict(k) for k in claims if k["cache_id"] == r["id"]]})
        return out

    def update_cache(self, cache_id: int, **fields: Any) -> None:
        self._update("caches", CACHE_FIELDS, fields, "id = ?", (cache_id,))

    def forget_cache_claim(self, cache_id: int, task: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM cache_claims WHERE cache_id = ? AND task = ?",
                             (cache_id, task))

    def drop_cache(self, cache_id: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM cache_claims WHERE cache_id = ?", (cache_id,))
            self._db.execute("DELETE FROM caches WHERE id = ?", (cache_id,))

    def add_run_cache(self, run_id: int, cache_id: int, generation: int) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO run_caches VALUES (?, ?, ?)",
                             (run_id, cache_id, generation))

    def run_caches(self, run_id: int) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM run_caches WHERE run_id = ?", (run_id,))
        return [dict(r) for r in rows]

    def first_delivery(self, delivery: str) -> bool:
        """Record a webhook delivery; False if it was seen before (a replay)."""
        with self._transaction():
            cur = self._db.execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?)",
                                   (delivery, time.time()))
        return cur.rowcount == 1

    def evictable_runs(self) -> list[RunRecord]:
        """Finished runs whose container and layers are still there, oldest first."""
        rows = self._db.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status NOT IN ('queued', 'running')"  # noqa: S608
            " AND (removed_at IS NULL OR log_removed_at IS NULL) ORDER BY id")
        return [_record(r) for r in rows]

    def all_runs_newest_first(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT id, owner, task FROM runs ORDER BY id DESC")
        return [dict(r) for r in rows]

    def image_last_used(self) -> dict[str, float]:
        """Each image a run used (its tag), and when a run last did."""
        rows = self._db.execute("SELECT image, max(created_at) FROM runs GROUP BY image")
        return {r[0]: float(r[1]) for r in rows}

    def worktree_uses(self) -> list[dict[str, Any]]:
        """Each base worktree, its owner, when a run last used it, and how
        many runs that still have their layers over it (a restart or retry
        of them needs it) there are."""
        rows = self._db.execute(
            "SELECT w.volume, w.owner, coalesce(max(r.created_at), w.updated_at) AS last_used,"
            " count(r.id) FILTER (WHERE r.removed_at IS NULL) AS kept_runs FROM worktrees w"
            " LEFT JOIN run_worktrees u ON u.volume = w.volume LEFT JOIN runs r ON"
            " r.id = u.run_id GROUP BY w.volume")
        return [dict(r) for r in rows]

    def forget_worktree(self, volume: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM worktrees WHERE volume = ?", (volume,))

    def update_run(self, run_id: int, **fields: Any) -> None:
        if isinstance(fields.get("status"), RunStatus):
            fields["status"] = fields["status"].value
        self._update("runs", RUN_FIELDS, fields, "id = ?", (run_id,))

    def _update(self, table: str, allowed: frozenset[str], fields: dict[str, Any], where: str,
                key: tuple[Any, ...]) -> None:
        """Set ``fields`` of one row; their names go into the SQL, so only
        ``allowed`` ones are taken (KeyError for another)."""
        for name in fields:
            if name not in allowed:
                raise KeyError(name)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._transaction():
            self._db.execute(f"UPDATE {table} SET {assignments} WHERE {where}",  # noqa: S608
                             (*fields.values(), *key))

    def run_declaration(self, run_id: int) -> dict[str, Any]:
        row = self._db.execute("SELECT declaration FROM runs WHERE id = ?", (run_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    def get_run(self, run_id: int) -> RunRecord | None:
        row = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?",  # noqa: S608
                               (run_id,)).fetchone()
        return _record(row) if row else None

    def list_runs(self, *, task: str | None = None, status: str | None = None,
                  owner: str | None = None, limit: int = 20) -> list[RunRecord]:
        filters = {"task": task, "status": status, "owner": owner}
        wanted = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"{column} = ?" for column in wanted)
        query = f"SELECT {_RUN_COLUMNS} FROM runs"  # noqa: S608
        rows = self._db.execute(query + (f" WHERE {where}" if where else "")
                                + " ORDER BY id DESC LIMIT ?", (*wanted.values(), limit))
        return [_record(r) for r in rows]

    # -- web logins (only digests: a stolen database opens no session) ----------------

    def add_web_token(self, kind: str, digest: str, uid: int, lifetime: float,
                      csrf: str | None = None) -> float:
        now = time.time()
        with self._transaction():
            self._db.execute("DELETE FROM web_tokens WHERE expires_at < ?", (now,))
            self._db.execute("INSERT INTO web_tokens VALUES (?, ?, ?, ?, ?, ?)",
                             (digest, kind, uid, csrf, now, now + lifetime))
        return now + lifetime

    def web_token(self, kind: str, digest: str, *, take: bool = False) -> dict[str, Any] | None:
        """The live token of ``kind`` with ``digest``; ``take`` uses it up."""
        with self._transaction():
            row = self._db.execute(
                "SELECT uid, csrf, expires_at FROM web_tokens"
                " WHERE digest = ? AND kind = ? AND expires_at >= ?",
                (digest, kind, time.time())).fetchone()
            if take:
                self._db.execute("DELETE FROM web_tokens WHERE digest = ?", (digest,))
        return dict(row) if row else None

    def drop_web_tokens(self, digest: str | None = None) -> int:
        """Revoke one token, or every one (``None``); returns how many."""
        with self._transaction():
            if digest is None:
                cur = self._db.execute("DELETE FROM web_tokens")
            else:
                cur = self._db.execute("DELETE FROM web_tokens WHERE digest = ?", (digest,))
        return cur.rowcount

    # -- worktrees ---------------------------------------------------------------

    def worktree_commit(self, volume: str) -> str | None:
        """The commit of a base worktree whose checkout completed, else None."""
        row = self._db.execute("SELECT commit_sha FROM worktrees WHERE volume = ? AND ready = 1",
                               (volume,)).fetchone()
        return str(row[0]) if row else None

    def worktree_checking_out(self, volume: str, owner: str, entry: dict[str, Any]) -> None:
        """Recorded before the checkout container runs: not ready until done."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO worktrees (volume, owner, entry, ready, updated_at)"
                " VALUES (?, ?, ?, 0, ?) ON CONFLICT (volume) DO UPDATE"
                " SET ready = 0, updated_at = excluded.updated_at",
                (volume, owner, json.dumps(entry, ensure_ascii=False), time.time()))

    def worktree_ready(self, volume: str, commit: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE worktrees SET ready = 1, commit_sha = ?, updated_at = ?"
                             " WHERE volume = ?", (commit, time.time(), volume))

    def add_run_worktree(self, run_id: int, volume: str, mount_name: str, commit: str,
                         reused: bool) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO run_worktrees VALUES (?, ?, ?, ?, ?)",
                             (run_id, volume, mount_name, commit, int(reused)))

    def run_worktrees(self, run_id: int) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT volume, mount_name, commit_sha, reused FROM run_worktrees"
                                " WHERE run_id = ? ORDER BY rowid", (run_id,))
        return [{**dict(r), "reused": bool(r["reused"])} for r in rows]

    def unfinished_runs(self) -> list[RunRecord]:
        rows = self._db.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'running')"  # noqa: S608
            " ORDER BY id")
        return [_record(r) for r in rows]

