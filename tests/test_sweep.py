"""Sweeps: python -m core sweep on a tiny model (methods mode and knob mode), the leaderboard read from each run's
own events, the self-contained report, the advisor's verdict, and bad input as one sentence."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from core.__main__ import main
from core.config import RunConfig
from core.events import of_type, read_events
from core.leaderboard import COLUMNS, best_values, ranked, verdict
from core.methods import spec
from core.sweep import RESULTS_FILE, REPORT_FILE, parse_knob, parse_methods, plan_sweep
from test_train import save_tiny_lm, write_qa

COMMON = ["--batch-size", "4", "--max-len", "64", "--eval-max-rows", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    return save_tiny_lm(d / "model", init=0.5), write_qa(d / "qa.json", n=12)


@pytest.fixture(scope="module")
def methods_sweep(tiny, tmp_path_factory):
    model, data = tiny
    out = tmp_path_factory.mktemp("methods") / "sweep"
    rc = main(["sweep", "--model", str(model), "--data", str(data), "--methods", "lora,bitfit,prefix_tuning",
               "--steps", "3", "--out", str(out), *COMMON])
    assert rc == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_results_csv_matches_each_runs_events(methods_sweep):
    rows = read_csv(methods_sweep / RESULTS_FILE)
    assert [r["run"] for r in rows] == ["lora", "bitfit", "prefix_tuning"]
    assert list(rows[0]) == list(COLUMNS)
    for r in rows:
        run = methods_sweep / r["run"]
        events = read_events(run)
        start, last = of_type(events, "start")[0], of_type(events, "step")[-1]
        final = [e for e in of_type(events, "eval") if "task_metric" in e][-1]
        assert r["status"] == "completed" and r["method"] == r["run"]
        assert r["task_metric"] == final["task_metric"] == "rouge_l"  # QA's headline metric
        assert float(r["task_score"]) == pytest.approx(final["task_score"])
        assert float(r["eval_loss"]) == pytest.approx(final["eval_loss"])
        assert int(r["trainable"]) == start["trainable"]
        assert float(r["trainable_pct"]) == pytest.approx(100 * start["trainable"] / start["total_params"], abs=1e-4)
        assert int(r["steps"]) == last["step"] == 3
        assert float(r["train_s"]) == pytest.approx(last["elapsed_s"])
        assert int(r["supervised_tokens"]) == last["supervised_tokens"] > 0
        assert float(r["tokens_per_s"]) == pytest.approx(last["supervised_tokens"] / last["elapsed_s"], abs=0.05)  # rounded to 0.1
        assert float(r["peak_mem_mb"]) == pytest.approx(last["peak_mem_mb"]) and last["peak_mem_mb"] > 0
        size = sum(p.stat().st_size for p in (run / "adapter").rglob("*") if p.is_file())
        assert float(r["adapter_mb"]) == pytest.approx(size / 2**20, abs=1e-3)
        assert r["can_merge"] == str(spec(r["method"]).can_merge)
    # the same split, seed and budget for every run; each method its own suggested lr
    configs = [RunConfig.load(methods_sweep / r["run"] / "config.yaml") for r in rows]
    assert len({(c.data.path, c.data.val_fraction, c.train.seed, c.train.max_steps) for c in configs}) == 1
    assert [c.train.lr for c in configs] == [spec(r["run"]).lr for r in rows]
    starts = [of_type(read_events(methods_sweep / r["run"]), "start")[0] for r in rows]
    assert len({(s["train_examples"], s["val_examples"]) for s in starts}) == 1
    # every run trained on the same tokens: same data order and split
    assert len({r["supervised_tokens"] for r in rows}) == 1


def test_report_is_self_contained(methods_sweep):
    text = (methods_sweep / REPORT_FILE).read_text(encoding="utf-8")
    assert "Plotly" in text and "newPlot" in text  # plotly.js inlined, the chart drawn
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", text, re.I)  # nothing fetched
    for name in ("lora", "bitfit", "prefix_tuning"):
        assert f"<td>{name}" in text or f">{name} " in text
    assert "Advisor (" in text and "★" in text


def test_cli_prints_leaderboard_and_verdict(tiny, tmp_path, capsys):
    model, data = tiny
    rc = main(["sweep", "--model", str(model), "--data", str(data), "--methods", "lora", "--knob", "r=2,4",
               "--steps", "2", "--out", str(tmp_path / "k"), *COMMON])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = read_csv(tmp_path / "k" / RESULTS_FILE)
    assert [r["run"] for r in rows] == ["lora-r2", "lora-r4"] and [r["knobs"] for r in rows] == ["r=2", "r=4"]
    assert [RunConfig.load(tmp_path / "k" / n / "config.yaml").method.r for n in ("lora-r2", "lora-r4")] == [2, 4]
    assert int(rows[1]["trainable"]) == 2 * int(rows[0]["trainable"])  # LoRA's count is linear in r
    assert "lora-r2" in out and "Advisor (" in out and "agrees" in out  # the advisor says LoRA, only LoRA ran


@pytest.mark.parametrize("args, message", [
    (["--methods", "lora,nope"], "unknown method 'nope'"),
    (["--methods", " , "], "no methods given"),
    (["--methods", "lora", "--knob", "rank=4,8"], "'rank' is not a knob of lora"),
    (["--methods", "lora", "--knob", "r=4,zero"], "LoraConfig.r = 'zero' is invalid"),
    (["--methods", "lora", "--knob", "r=4"], "at least two values"),
    (["--methods", "lora,bitfit", "--knob", "r=4,8"], "--knob varies one method"),
    (["--methods", "lora", "--steps", "0"], "--steps 0"),
    (["--methods", "lora", "--knob", "r=4,4096"], "LoraConfig.r = 4096 is invalid: must be <= min(in, out)"),  # preflight
])
def test_bad_input_is_one_sentence(tiny, tmp_path, capsys, args, message):
    model, data = tiny
    argv = ["sweep", "--model", str(model), "--data", str(data), "--steps", "2", "--out", str(tmp_path / "o"), *args]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written


def test_parsers_and_plan():
    assert parse_methods(["lora", " bitfit "]) == ["lora", "bitfit"]
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods("lora,lora")
    assert parse_knob("num_virtual_tokens=10,20", "prefix_tuning").values == (10, 20)
    with pytest.raises(ValueError, match="holds a list"):
        parse_knob("targets=q_proj,v_proj", "lora")
    base = RunConfig.from_dict({"data": {"path": "x.json"}, "train": {"max_steps": 5, "seed": 7}})
    runs = plan_sweep(base, ["lora", "prompt_tuning"])
    assert [r.config.train.lr for r in runs] == [spec("lora").lr, spec("prompt_tuning").lr]
    assert all(r.config.train.seed == 7 and r.config.train.max_steps == 5 for r in runs)
    with pytest.raises(ValueError, match="step budget"):
        plan_sweep(RunConfig.from_dict({"data": {"path": "x.json"}}), ["lora"])


def _row(run, method, score, loss, **kw):
    return {"run": run, "method": method, "task_metric": "rouge_l", "task_score": score, "eval_loss": loss, **kw}


def test_best_ranking_and_verdict():
    rows = [_row("a", "bitfit", 0.2, 1.0, trainable=10, can_merge=True),
            _row("b", "lora", 0.5, 1.5, trainable=50, can_merge=True),
            _row("c", "prefix_tuning", 0.5, 1.2, trainable=30, can_merge=False)]
    assert [r["run"] for r in ranked(rows)] == ["c", "b", "a"]  # a tie on the score goes to the lower eval loss
    best = best_values(rows)
    assert best["task_score"] == 0.5 and best["eval_loss"] == 1.0 and best["trainable"] == 10
    assert best["can_merge"] is True
    v = verdict(rows, 200, "cpu", "quality")  # the advisor says LoRA for 200 rows on a CPU
    assert v["recommended"] == "lora" and v["best"] == "prefix_tuning" and v["agreed"] is False
    assert "disagrees" in v["text"] and "tied with 1 other run" in v["text"]
    rows[1]["task_score"] = 0.9
    assert verdict(rows, 200, "cpu", "quality")["agreed"] is True
    loss_rows = [dict(r, task_metric="eval_loss", task_score=r["eval_loss"]) for r in rows]
    assert ranked(loss_rows)[0]["run"] == "a"  # plain text: lower is better
