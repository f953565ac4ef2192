import os
import subprocess
import sys

import pytest

from core.config import RunConfig, TrainConfig
from core.methods.lora import LoraConfig
from studio.paths import UnsafePathError, clean_name, inside
from studio.store import RunStore


def cfg(name=""):
    return RunConfig(name=name, method=LoraConfig(r=4), train=TrainConfig(max_steps=3))


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "data")


def test_create_get_list_and_config_written(store):
    a = store.create(cfg(), name="first")
    b = store.create(cfg(), name="second")
    assert a.status == "queued" and a.method == "lora" and a.name == "first"
    assert (a.dir / "config.yaml").is_file()
    assert RunConfig.load(a.dir / "config.yaml").name == "first"
    assert a.dir.parent == store.runs_root
    assert [r.id for r in store.list()] == [b.id, a.id]  # newest first
    assert [r.id for r in store.queued()] == [a.id, b.id]  # queue order: oldest first
    assert store.get(a.id).config["method_config"]["r"] == 4


def test_status_updates_and_registry_survives_reopen(store, tmp_path):
    run = store.create(cfg(), name="r")
    store.update(run.id, status="running", pid=123, started=1.0)
    store.set_status(run.id, "completed", final_loss=0.5)
    again = RunStore(tmp_path / "data").get(run.id)
    assert again.status == "completed" and again.final_loss == 0.5 and again.pid is None and again.finished
    with pytest.raises(ValueError, match="status"):
        store.update(run.id, status="exploded")
    with pytest.raises(ValueError, match="unknown run field"):
        store.update(run.id, config="x")


def test_rename_and_requeue(store):
    run = store.create(cfg(), name="old")
    assert store.rename(run.id, "  new name ") == "new name"
    assert store.get(run.id).name == "new name"
    with pytest.raises(ValueError, match="only a finished run"):
        store.requeue(run.id)
    store.set_status(run.id, "interrupted", "killed")
    store.requeue(run.id)
    r = store.get(run.id)
    assert r.status == "queued" and r.resume == 1 and r.reason == ""


def test_delete_removes_folder_and_refuses_active(store):
    run = store.create(cfg(), name="doomed")
    (run.dir / "adapter").mkdir()
    with pytest.raises(ValueError, match="stop it"):
        store.delete(run.id)
    store.set_status(run.id, "stopped")
    store.delete(run.id)
    assert store.get(run.id) is None and not run.dir.exists()


def test_delete_does_not_follow_a_planted_symlink(store, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    run = store.create(cfg(), name="r")
    store.set_status(run.id, "failed")
    import shutil

    shutil.rmtree(run.dir)
    os.symlink(victim, run.dir)
    with pytest.raises(UnsafePathError):
        store.run_dir(run.id)
    with pytest.raises(UnsafePathError):
        store.delete(run.id)
    assert (victim / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad", ["../x", "a/b", "..\\..\\etc", "/etc/passwd", ".hidden", "~root", "", "x" * 81, "a\x00b", "a\nb"])
def test_bad_run_names_are_refused(store, bad):
    run = store.create(cfg(), name="ok")
    with pytest.raises(ValueError):
        clean_name(bad)
    with pytest.raises(ValueError):
        store.rename(run.id, bad)
    if bad:  # an empty name on create means "use the default name"
        with pytest.raises(ValueError):
            store.create(cfg(), name=bad)
    assert store.get(run.id).name == "ok"
    assert len(store.list()) == 1


@pytest.mark.parametrize("bad_id", ["../../etc", "/tmp", "20250101-000000-abcdef/../x", "..", "x"])
def test_bad_run_ids_never_become_paths(store, bad_id):
    with pytest.raises(UnsafePathError):
        store.run_dir(bad_id)
    with pytest.raises(UnsafePathError):
        store.get(bad_id)


def test_inside_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert inside(root, "a", "b.txt") == root.resolve() / "a" / "b.txt"
    for bad in ("../x", "/abs", "a/../../x"):
        with pytest.raises(UnsafePathError):
            inside(root, bad)
    os.symlink(tmp_path, root / "link")
    with pytest.raises(UnsafePathError):
        inside(root, "link", "x")


def test_mark_orphans(store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        a = store.create(cfg(), name="orphan")
        b = store.create(cfg(), name="alive")
        c = store.create(cfg(), name="done")
        store.update(a.id, status="running", pid=dead.pid)
        store.update(b.id, status="running", pid=live.pid)
        store.set_status(c.id, "completed")
        assert store.mark_orphans() == [a.id]
        assert store.get(a.id).status == "interrupted" and "restarted" in store.get(a.id).reason
        assert store.get(b.id).status == "running"
        assert store.get(c.id).status == "completed"
    finally:
        live.kill()
        live.wait()


def test_uploads_are_stored_under_safe_names_once_per_content(tmp_path):
    from core.data import DataError
    from studio.datasets import shown_name, store_upload

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    src = tmp_path / "src.json"
    src.write_text('[{"text": "hi"}]')
    stored = {}
    for name in ("../../etc/evil.json", "/abs/path.json", "ok.JSONL", "我的 数据.json"):
        dest, new = store_upload(uploads, src, name, max_bytes=1024)
        assert new and dest.parent == uploads.resolve() and len(dest.name.split("-")[0]) == 16
        stored[name] = dest
    assert [shown_name(stored[n]) for n in stored] == ["evil.json", "path.json", "ok.jsonl", "我的_数据.json"]
    assert store_upload(uploads, src, "ok.JSONL", max_bytes=1024) == (stored["ok.JSONL"], False)  # stored once
    other = tmp_path / "other.json"
    other.write_text('[{"text": "bye"}]')
    assert store_upload(uploads, other, "ok.JSONL", max_bytes=1024)[0] != stored["ok.JSONL"]  # new content
    with pytest.raises(DataError, match="only .json, .jsonl, .csv and .parquet"):
        store_upload(uploads, src, "run.py", max_bytes=1024)
    with pytest.raises(DataError, match="limit"):
        store_upload(uploads, src, "big.json", max_bytes=4)
    assert len(list(uploads.iterdir())) == 5  # and no partial copy left behind
    long_name = "\U00020000" * 100 + ".json"  # 4 bytes each in UTF-8: the stored name stays within 255 bytes
    assert len(store_upload(uploads, other, long_name, max_bytes=1024)[0].name.encode()) <= 255


def test_a_registry_migrated_by_a_newer_version_still_reads(store):
    """A newer studio or CLI may add columns while this one runs: rows still read (the column is ignored)."""
    import sqlite3

    run = store.create(cfg("kept"))
    with sqlite3.connect(store.db_path) as db:
        db.execute("ALTER TABLE runs ADD COLUMN from_the_future TEXT")
    assert [r.id for r in store.list()] == [run.id] and store.get(run.id).name == "kept"


def test_sweeps_link_runs_and_an_older_registry_gains_the_column(tmp_path):
    import sqlite3

    data = tmp_path / "old"
    data.mkdir()
    db = sqlite3.connect(data / "studio.sqlite3")  # a registry from before experiments: no sweep column/table
    db.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, model TEXT NOT NULL DEFAULT '', "
               "method TEXT NOT NULL DEFAULT '', status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', pid INTEGER, "
               "device TEXT NOT NULL DEFAULT '', created REAL NOT NULL, started REAL, finished REAL, "
               "trainable INTEGER, total_params INTEGER, final_loss REAL, final_eval_loss REAL, steps INTEGER, total_steps INTEGER, "
               "resume INTEGER NOT NULL DEFAULT 0, queued_at REAL, config TEXT NOT NULL DEFAULT '{}')")
    db.commit()
    db.close()
    store = RunStore(data)
    a, b, lone = (store.create(cfg(), name=n) for n in ("a", "b", "lone"))
    assert lone.sweep is None
    sid = store.create_sweep("cmp", {"runs": ["a", "b"], "knob": None}, [a.id, b.id])
    got = store.sweep(sid)
    assert got["name"] == "cmp" and got["record"]["runs"] == ["a", "b"]
    assert [r.id for r in got["runs"]] == [a.id, b.id] and store.get(a.id).sweep == sid
    assert [s["id"] for s in store.sweeps()] == [sid] and store.get(lone.id).sweep is None
    with pytest.raises(KeyError):
        store.create_sweep("bad", {}, ["20990101-000000-abcdef"])  # an unknown run: nothing is linked
    assert len(store.sweeps()) == 1
