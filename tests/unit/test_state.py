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


def claim(task: str, source: str = "t.yml:3") -> dict[str, object]:
    return {"owner": "alice", "name": "cargo", "task": task, "shared": True,
            "layered": False, "quota": 1 << 30, "source": source}


def test_cache_claims_follow_the_declarations(tmp_path: Path) -> None:
    st = statemod.StateStore(tmp_path / "s.db")
    said = st.claim_caches([claim("a"), claim("b")])
    assert said == ["cache alice/cargo claimed by a (t.yml:3)",
                    "cache alice/cargo claimed by b (t.yml:3)"]
    assert st.claim_caches([claim("a"), claim("b")]) == []  # nothing new: nothing said
    (cache,) = st.caches()
    assert [(k["task"], k["released_at"]) for k in cache["claims"]] == [("a", None), ("b", None)]
    # b's declaration is gone: its claim is released (removal pending), not dropped.
    assert st.claim_caches([claim("a")]) == [
        "cache alice/cargo: task b no longer declares it; released, removal pending"]
    claims = {k["task"]: k for k in st.caches()[0]["claims"]}
    assert claims["a"]["released_at"] is None and claims["b"]["released_at"] is not None
    assert claims["b"]["released_how"] == "no declaration claims it"
    # Declared again within its grace: claimed again, with its data.
    st.claim_caches([claim("a"), claim("b", "u.yml:9")])
    claims = {k["task"]: k for k in st.caches()[0]["claims"]}
    assert claims["b"]["released_at"] is None and claims["b"]["source"] == "u.yml:9"
    st.forget_cache_claim(cache["id"], "b")
    assert [k["task"] for k in st.caches()[0]["claims"]] == ["a"]
    with pytest.raises(KeyError):
        st.update_cache(cache["id"], owner="mallory")
    st.drop_cache(cache["id"])
    assert st.caches() == []
