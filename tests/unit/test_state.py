from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent import state as statemod
from agent.model import Requester, RunStatus, Task

TASK = Task(name="t", owner="o", source="f:1", image="img", command=None)
ME = Requester(uid=1000, gid=1001, pid=42)


def test_wal_mode_schema_version_and_instance(tmp_path: Path) -> None:
    st = statemod.StateStore(tmp_path / "s.db")
    assert st.schema_version == len(statemod.MIGRATIONS)
    assert st._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    instance = st.instance()
    st.close()
    again = statemod.StateStore(tmp_path / "s.db")
    assert again.instance() == instance  # stable across restarts
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600


def test_runs_are_recorded_with_their_requester(tmp_path: Path) -> None:
    st = statemod.StateStore(tmp_path / "s.db")
    first = st.create_run(TASK, ME, {"name": "t"})
    second = st.create_run(TASK, ME, {"name": "t"})
    st.update_run(first, status=RunStatus.SUCCEEDED, exit_code=0)
    rec = st.get_run(first)
    assert rec is not None and rec.status is RunStatus.SUCCEEDED and rec.exit_code == 0
    assert (rec.requested_uid, rec.requested_gid, rec.requested_pid) == (1000, 1001, 42)
    assert [r.id for r in st.list_runs(task="t", limit=5)] == [second, first]
    assert [r.id for r in st.unfinished_runs()] == [second]
    assert st.get_run(999) is None


def test_update_refuses_unknown_columns(tmp_path: Path) -> None:
    st = statemod.StateStore(tmp_path / "s.db")
    run = st.create_run(TASK, ME, {})
    with pytest.raises(KeyError):
        st.update_run(run, **{"status = 'x'; --": 1})


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute(f"PRAGMA user_version = {len(statemod.MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(statemod.SchemaTooNew, match="newer than this efci"):
        statemod.StateStore(tmp_path / "s.db")
