"""studio.sweeps without a browser: an experiment queues its runs through the job queue (same split, seed and
steps), the registry links them, the leaderboard is read from their events, the files download, and the top runs
go to Chat; bad input is one sentence and queues nothing. Tiny model of conftest.py."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from core.events import of_type, read_events
from core.leaderboard import COLUMNS
from core.methods import spec
from studio import sweeps
from studio.context import StudioContext
from studio.tabs.experiment import styled

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "assets" / "qa_sample.jsonl")


@pytest.fixture
def idle(tmp_path, tiny_model_dir):
    """A context whose queue is not started: submitted runs stay queued."""
    c = StudioContext.create(tmp_path / "data", default_model=tiny_model_dir, start_jobs=False)
    yield c
    c.close()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """An experiment of two methods, run to the end by the real queue and workers."""
    c = StudioContext.create(tmp_path_factory.mktemp("exp") / "data", default_model=tiny_model_dir)
    started = sweeps.start_experiment(c, {"data.path": SAMPLE, "methods": ["lora", "bitfit"], "steps": 2,
                                          "name": "cmp", "batch_size": 4, "max_len": 96})
    deadline = time.time() + 600
    while time.time() < deadline and any(c.store.get(r["id"]).active for r in started["runs"]):
        time.sleep(0.5)
    yield c, started
    c.close()


@pytest.mark.parametrize("form, message", [
    ({"methods": []}, "no methods given"),
    ({"methods": ["lora", "nope"]}, "unknown method 'nope'"),
    ({"methods": ["lora", "bitfit"], "knob": "r=4,8"}, "A knob experiment varies one method"),
    ({"methods": ["lora"], "knob": "r=4,many"}, "LoraConfig.r = 'many' is invalid"),
    ({"methods": ["lora"], "knob": "dropout_rate=0.1,0.2"}, "'dropout_rate' is not a knob of lora"),
    ({"methods": ["lora"], "steps": 0}, "Steps: enter a whole number"),
    ({"methods": ["lora"], "data.path": "/etc/passwd"}, "only an uploaded dataset or a bundled sample"),
])
def test_bad_input_queues_nothing(idle, form, message):
    with pytest.raises(ValueError) as e:
        sweeps.start_experiment(idle, {"data.path": SAMPLE, "steps": 3, **form})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert idle.store.list() == [] and idle.store.sweeps() == []


def test_knob_experiment_queues_one_run_per_value(idle):
    started = sweeps.start_experiment(idle, {"data.path": SAMPLE, "methods": "lora", "knob": "r=2,4,8", "steps": 5,
                                             "seed": 7, "name": "ranks"})
    assert [r["label"] for r in started["runs"]] == ["lora-r2", "lora-r4", "lora-r8"]
    runs = [idle.store.get(r["id"]) for r in started["runs"]]
    assert [r.status for r in runs] == ["queued"] * 3 and {r.sweep for r in runs} == {started["id"]}
    assert [r.method_config()["r"] for r in runs] == [2, 4, 8]
    trains = [r.config["train"] for r in runs]
    assert {(t["seed"], t["max_steps"]) for t in trains} == {(7, 5)}
    assert all(r.config["data"] == runs[0].config["data"] for r in runs)  # the same data and split
    view = sweeps.experiment_view(idle, started["id"])
    assert [r["run"] for r in view["rows"]] == ["lora-r2", "lora-r4", "lora-r8"] and not view["done"]
    assert [r["knobs"] for r in view["rows"]] == ["r=2", "r=4", "r=8"]
    assert "No run has a task score yet" in view["verdict"]["text"]
    assert sweeps.experiments(idle) == [("ranks", started["id"])]
    with pytest.raises(ValueError, match="Chat needs 2 finished runs"):
        sweeps.top_runs(idle, started["id"])


def test_leaderboard_fills_from_the_runs_events(finished):
    c, started = finished
    view = sweeps.experiment_view(c, started["id"])
    assert view["done"] and [r["run"] for r in view["rows"]] == ["lora", "bitfit"]
    for row, run in zip(view["rows"], started["runs"]):
        assert row["id"] == run["id"] and row["status"] == "completed"
        events = read_events(c.store.get(run["id"]).dir)
        final = [e for e in of_type(events, "eval") if "task_metric" in e][-1]
        last = of_type(events, "step")[-1]
        assert row["task_score"] == final["task_score"] and row["eval_loss"] == final["eval_loss"]
        assert row["steps"] == last["step"] == 2 and row["peak_mem_mb"] == last["peak_mem_mb"]
        assert row["lr"] == spec(row["method"]).lr
    assert view["verdict"]["recommended"] == "lora" and view["verdict"]["agreed"] in (True, False)
    # the table the tab shows: numbers stay numbers; each column's best is starred
    table = sweeps.leaderboard_table(view)
    assert table["best"]["trainable params"] == min(r["trainable"] for r in view["rows"])
    shown = styled(view).to_html()
    assert "★" in shown


def test_files_and_top_runs_for_chat(finished):
    c, started = finished
    files = sweeps.experiment_files(c, started["id"])
    assert Path(files["csv"]).parent == c.exports_dir / "sweeps" / started["id"]
    with open(files["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["lora", "bitfit"] and list(rows[0]) == list(COLUMNS)
    html = Path(files["html"]).read_text(encoding="utf-8")
    assert "Plotly" in html and 'src="http' not in html
    top = sweeps.top_runs(c, started["id"], 2)
    view = sweeps.experiment_view(c, started["id"])
    from core.leaderboard import ranked

    assert top == [r["id"] for r in ranked(view["rows"])] and len(set(top)) == 2
