"""studio.actions without a browser or a server: named form values -> RunConfig -> preflight -> the job queue,
and the other things the tabs do (datasets, advisor, runs, chat, export), on the tiny model of conftest.py."""

import json
import os
import sys
import time
from itertools import product
from pathlib import Path

import pytest
import yaml

from core.advisor import GOALS, HARDWARE, recommend
from core.config import DataConfig, RunConfig, TrainConfig, method_config
from core.data import DataError
from core.methods import spec
from studio import actions, sweeps
from studio.context import StudioContext

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "assets" / "identity_sample.json")
LIMIT = 256 * 1024


@pytest.fixture
def ctx(tmp_path, tiny_model_dir):
    """A studio context whose queue is not started: submitted runs stay queued."""
    c = StudioContext.create(tmp_path / "data", default_model=tiny_model_dir, max_upload_bytes=LIMIT, start_jobs=False)
    yield c
    c.close()


def test_actions_import_no_gradio():
    code = "import sys, studio.actions; assert 'gradio' not in sys.modules, 'studio.actions imported gradio'"
    import subprocess

    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_defaults_are_cores_and_the_same_run_as_the_cli():
    d = actions.form_defaults()
    assert {k[6:]: v for k, v in d.items() if k.startswith("train.")} == {
        n: getattr(TrainConfig(), n) for n in actions.TRAIN_FORM}
    assert d["train.epochs"] == TrainConfig().epochs and d["train.eval_every"] == TrainConfig().eval_every
    assert (d["train.max_len"], d["data.val_fraction"], d["data.val_count"]) == (
        TrainConfig().max_len, DataConfig().val_fraction, DataConfig().val_count)
    for e in actions.ENTRIES:  # every knob of every entry defaults to its config's default or the preset's value
        cfg = spec(e.method).config_cls()
        for n in e.fields:
            assert d[actions.knob_id(e.key, n)] == e.defaults.get(n, getattr(cfg, n)), (e.key, n)
    # a form with nothing but the method and the data is the CLI's run: every other value is core's default
    cfg = actions.build_config({"method": "lora", "data.path": SAMPLE})
    cli = RunConfig(method=method_config("lora"), data=DataConfig(path=SAMPLE))
    assert cfg.to_dict() == cli.to_dict()
    # and the whole default form (what a fresh page sends) is the same run too
    full = dict(d, **{"data.path": SAMPLE})
    assert actions.build_config(full).to_dict() == cli.to_dict()


def test_named_knobs_only_of_the_chosen_entry():
    cfg = actions.build_config({
        "method": "lora", "lora.r": 4.0, "lora.targets": "q_proj, k_proj", "train.lr": 1e-3, "train.max_steps": 7,
        "full.freeze_bottom": 99, "prompt_tuning.num_virtual_tokens": 0,  # other entries' knobs: ignored
        "data.val_count": 3, "model": " some/model ",
    }, max_bytes=1234)
    assert cfg.method_name == "lora" and cfg.method.r == 4 and isinstance(cfg.method.r, int)
    assert cfg.method.targets == ["q_proj", "k_proj"]
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7
    assert cfg.data.val_count == 3 and cfg.data.max_bytes == 1234 and cfg.model == "some/model"


def test_presets_set_their_values_and_take_their_own_knobs():
    llrd = actions.build_config({"method": "llrd"})
    assert llrd.method_name == "full" and llrd.train.llrd_decay == 0.9
    assert actions.build_config({"method": "llrd", "llrd.train.llrd_decay": 0.8}).train.llrd_decay == 0.8
    lw = actions.build_config({"method": "layerwise", "layerwise.unfreeze_every": 3})
    assert lw.method_name == "full" and lw.method.unfreeze_every == 3 and lw.train.llrd_decay == 1.0
    assert actions.build_config({"method": "layerwise"}).method.unfreeze_every == 10
    assert actions.entry_for("full", {}, {"llrd_decay": 0.9}) == "llrd"


@pytest.mark.parametrize("form, needle", [
    ({"method": "lora", "lora.rank": 4}, "unknown form field(s) lora.rank"),
    ({"method": "nope"}, "Method: choose one of"),
    ({"method": "lora", "lora.r": None}, "R: enter a value"),
    ({"method": "lora", "train.lr": None}, "Lr: enter a value"),
    ({"method": "lora", "lora.r": 0}, "LoraConfig.r = 0 is invalid"),
    ({"method": "lora", "train.batch_size": 0}, "TrainConfig.batch_size = 0 is invalid"),
    ({"method": "lora", "data.val_fraction": 0.9}, "DataConfig.val_fraction = 0.9 is invalid"),
])
def test_bad_forms_name_the_field(form, needle):
    with pytest.raises(ValueError) as e:
        actions.build_config(form)
    assert needle in str(e.value)


def test_datasets_sample_upload_and_refusals(ctx, tmp_path):
    d = actions.use_sample(ctx, "identity_sample.json", max_len=128)
    assert d["format"] == "instruction" and d["valid_rows"] == d["total_rows"] > 0 and d["max_len"] == 128
    json.dumps(d)  # plain data
    good = tmp_path / "mine.jsonl"
    good.write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n', encoding="utf-8")
    up = actions.upload_dataset(ctx, str(good), max_len=64)
    assert up["name"] == "mine.jsonl" and up["valid_rows"] == 2 and Path(up["path"]).parent == ctx.uploads_dir
    bad = tmp_path / "bad.json"
    bad.write_text('{"instruction": "a"', encoding="utf-8")
    with pytest.raises(DataError, match="bad.json"):
        actions.upload_dataset(ctx, str(bad))
    # the Experiment tab lists the accepted upload under its own name, once; the refused one was not kept
    actions.upload_dataset(ctx, str(good), max_len=64)
    uploads = [label for label, _ in sweeps.dataset_choices(ctx) if label.startswith("upload")]
    assert uploads == ["upload · mine.jsonl"] and len(list(ctx.uploads_dir.iterdir())) == 1
    # another file under the same name is a second upload, and the list tells the two apart
    other = tmp_path / "other" / "mine.jsonl"
    other.parent.mkdir()
    other.write_text('{"text": "another row"}\n{"text": "and one more"}\n', encoding="utf-8")
    up2 = actions.upload_dataset(ctx, str(other), max_len=64)
    choices = {path: label for label, path in sweeps.dataset_choices(ctx) if label.startswith("upload")}
    assert set(choices) == {up["path"], up2["path"]} and len(set(choices.values())) == 2
    assert all(label.startswith("upload · mine.jsonl (") for label in choices.values())
    os.remove(up2["path"])
    # a reloaded page reads its dataset again by the stored path; no other path is read
    again = actions.reopen_dataset(ctx, up["path"], max_len=64)
    assert (again["name"], again["valid_rows"], again["path"]) == ("mine.jsonl", 2, up["path"])
    assert actions.reopen_dataset(ctx, d["path"], max_len=128)["name"] == "identity_sample.json"
    with pytest.raises(DataError, match="only an uploaded dataset or a bundled sample"):
        actions.reopen_dataset(ctx, str(good))
    with pytest.raises(DataError, match="only .json, .jsonl, .csv and .parquet"):
        actions.upload_dataset(ctx, str(good), name="data.txt")
    with pytest.raises(DataError, match="Unknown sample 'nope.json'"):
        actions.use_sample(ctx, "nope.json")
    with pytest.raises(DataError, match="at least 8"):
        actions.use_sample(ctx, "identity_sample.json", max_len=4)


def test_csv_and_parquet_uploads_with_a_column_mapping_and_the_preview_cache(ctx, tmp_path, monkeypatch):
    import pandas as pd

    from core.data import load as load_module

    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("yes", "no", "maybe")]
    pd.DataFrame(rows).to_csv(tmp_path / "pc.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "pc.parquet")
    (tmp_path / "ref.json").write_text(json.dumps([{"instruction": r["prompt"], "output": r["completion"]}
                                                   for r in rows]), encoding="utf-8")
    ref = actions.upload_dataset(ctx, str(tmp_path / "ref.json"), max_len=64)
    for name in ("pc.csv", "pc.parquet"):
        up = actions.upload_dataset(ctx, str(tmp_path / name), max_len=64, fields="instruction=prompt, output=completion")
        assert (up["name"], up["format"], up["valid_rows"]) == (name, "instruction", 3)
        assert up["previews"] == ref["previews"] and up["fields"] == {"instruction": "prompt", "output": "completion"}
        assert Path(up["path"]).suffix == Path(name).suffix and Path(up["path"]).parent == ctx.uploads_dir
    with pytest.raises(DataError, match="Column mapping: DataConfig.fields = 'prompt' is invalid"):
        actions.upload_dataset(ctx, str(tmp_path / "pc.csv"), fields="prompt")
    with pytest.raises(DataError, match="Could not detect the dataset format"):
        actions.upload_dataset(ctx, str(tmp_path / "pc.csv"))
    # inspecting the same data again reads the tokenised cache (DATA/tokenised/): nothing is tokenised
    calls = []
    real = load_module.encode_many
    monkeypatch.setattr(load_module, "encode_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = actions.use_sample(ctx, "identity_sample.json", max_len=96)
    assert calls
    calls.clear()
    assert actions.use_sample(ctx, "identity_sample.json", max_len=96) == again and calls == []
    cfg = actions.build_config({"method": "lora", "data.path": SAMPLE, "data.fields": "instruction=prompt"})
    assert cfg.data.fields == {"instruction": "prompt"}


def test_check_start_stop_rename_resume_delete(ctx, tmp_path):
    form = {"method": "lora", "lora.r": 4, "train.max_steps": 3, "train.batch_size": 2, "train.max_len": 64}
    est = actions.check(ctx, form)
    assert est["trainable"] > 0 and est["total"] > est["trainable"] and "Trainable parameters" in est["markdown"]
    with pytest.raises(ValueError, match="Load a dataset in the Data tab first"):
        actions.start_run(ctx, form)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(Path(SAMPLE).read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ValueError, match="data.path: only an uploaded dataset or a bundled sample"):
        actions.start_run(ctx, {**form, "data.path": str(outside)})
    with pytest.raises(ValueError, match="available: q_proj"):  # the engine's preflight, before anything is queued
        actions.start_run(ctx, {**form, "lora.targets": ["no_such_proj"], "data.path": SAMPLE})
    assert ctx.store.list() == []

    run = actions.start_run(ctx, {**form, "data.path": SAMPLE, "name": "  first  "})
    json.dumps(run)
    assert run["name"] == "first" and run["estimate"]["trainable"] == est["trainable"]
    saved = RunConfig.from_dict(yaml.safe_load((ctx.store.get(run["id"]).dir / "config.yaml").read_text()))
    expected = actions.config_of(ctx, {**form, "data.path": str(Path(SAMPLE).resolve())})
    assert saved.to_dict() == dict(expected.to_dict(), name="first")
    assert actions.run_status(ctx, run["id"])["status"] == "queued"
    assert actions.run_status(ctx, "../../etc") == {"status": "missing"}
    assert "removed from the queue" in actions.stop_run(ctx, run["id"])
    assert actions.run_status(ctx, run["id"])["status"] == "stopped"
    assert actions.stop_run(ctx) == "Nothing is running."
    assert actions.rename_run(ctx, run["id"], "second") == "second"
    with pytest.raises(ValueError, match="Choose a run first"):
        actions.rename_run(ctx, "", "x")
    assert actions.resume_run(ctx, run["id"])["name"] == "second"
    assert ctx.store.get(run["id"]).status == "queued"
    check = actions.delete_check(ctx, run["id"])
    assert not check["deletable"] and "stop it before deleting it" in check["reason"]
    actions.stop_run(ctx, run["id"])
    assert actions.delete_check(ctx, run["id"])["deletable"]
    folder = ctx.store.get(run["id"]).dir
    assert actions.delete_run(ctx, run["id"]) == "second"
    assert ctx.store.get(run["id"]) is None and not folder.exists()


@pytest.mark.parametrize("rows, hardware, goal", list(product([50, 2_000, 50_000], HARDWARE, GOALS)))
def test_applied_advice_is_the_advised_run(rows, hardware, goal):
    """Apply puts the advice into the form; the form then builds exactly the advised method, knobs and train values."""
    a = recommend(rows, hardware, goal)
    advice = actions.advise(rows, hardware, goal)
    json.dumps(advice)
    assert advice["method"] == a.method and advice["label"] == a.label and advice["reasons"] == a.reasons
    form = actions.apply_advice(advice)
    assert form == advice["form"] and form["method"] in actions.BY_KEY
    cfg = actions.build_config({**actions.form_defaults(), **form})
    assert cfg.method_name == a.method
    expected = method_config(a.method, {**actions.BY_KEY[form["method"]].defaults, **a.method_config})
    assert cfg.method.to_dict() == expected.to_dict()
    for k, v in a.train.items():
        assert getattr(cfg.train, k) == v, k


def test_advice_for_llrd_lands_on_the_llrd_entry():
    advice = actions.advise(50_000, "large_gpu", "quality")
    assert advice["form"]["method"] == "llrd" and advice["form"]["llrd.train.llrd_decay"] == 0.9
    assert advice["form"]["train.lr"] == spec("full").lr


def test_real_run_chat_and_export(tmp_path, tiny_model_dir):
    """One short LoRA run through the real worker, then chat (base vs adapter) and both exports."""
    c = StudioContext.create(tmp_path / "data", default_model=tiny_model_dir, max_upload_bytes=LIMIT)
    try:
        run = actions.start_run(c, {"method": "lora", "data.path": SAMPLE, "train.max_steps": 6,
                                    "train.batch_size": 4, "train.lr": 1e-2, "train.max_len": 128, "name": "quill"})
        end = time.time() + 300
        while actions.run_status(c, run["id"])["status"] in ("queued", "running") and time.time() < end:
            time.sleep(0.5)
        st = actions.run_status(c, run["id"])
        assert st["status"] == "completed" and st["step"] == 6, st
        answers = actions.chat(c, "What is your name?", [run["id"]], True, max_new_tokens=12)
        assert list(answers) == ["base", run["id"]]
        assert answers[run["id"]]["text"].strip() and answers["base"]["text"] != answers[run["id"]]["text"], answers
        merged = actions.chat(c, "What is your name?", [run["id"]], False, max_new_tokens=12, merged=True)
        assert merged[run["id"]]["text"] == answers[run["id"]]["text"]
        assert "merged" in merged[run["id"]]["stats"] and "unmerged" in answers[run["id"]]["stats"]
        z = actions.export_adapter(c, run["id"])
        assert Path(z["path"]).is_file() and z["bytes"] > 0 and "PeftModel" in z["snippet"]
        m = actions.export_merged(c, run["id"])
        assert (Path(m["folder"]) / "config.json").is_file() and m["archive"].endswith(".zip")
        with pytest.raises(ValueError, match="Type a message first"):
            actions.chat(c, "  ", [run["id"]])
    finally:
        for r in c.store.list(status=("running", "queued")):
            c.jobs.stop(r.id)
        c.close()


@pytest.mark.slow
def test_real_model_learns_its_name_quill(tmp_path):
    """On the bundled SmolLM2-135M, the README's headless LoRA recipe (r 16 on every linear, lr 2e-3, 30 steps of
    8) started from the studio's actions: the adapter says it is Quill and the base model does not."""
    c = StudioContext.create(tmp_path / "data", max_upload_bytes=LIMIT)
    try:
        run = actions.start_run(c, {"method": "lora", "data.path": SAMPLE, "lora.r": 16, "lora.alpha": 32,
                                    "lora.targets": ["all-linear"], "train.max_steps": 30, "train.batch_size": 8,
                                    "train.lr": 2e-3, "train.max_len": 128, "name": "quill"})
        end = time.time() + 1800
        while actions.run_status(c, run["id"])["status"] in ("queued", "running") and time.time() < end:
            time.sleep(2)
        assert actions.run_status(c, run["id"])["status"] == "completed"
        answers = actions.chat(c, "What is your name?", [run["id"]], True, max_new_tokens=24)
        assert "Quill" in answers[run["id"]]["text"], answers
        assert "Quill" not in answers["base"]["text"], answers
    finally:
        for r in c.store.list(status=("running", "queued")):
            c.jobs.stop(r.id)
        c.close()


def test_check_refuses_a_device_the_machine_lacks_and_fsdp_for_lora_like_start(ctx, monkeypatch):
    """Check says what Start would say, in one sentence naming the field, instead of a raw error or a clean
    estimate: a GPU this machine does not have, and FSDP2 for a method that trains none of the model's weights."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    form = {**actions.form_defaults(), "method": "lora"}
    with pytest.raises(ValueError, match="TrainConfig.device = 'cuda' is invalid: this machine has no CUDA GPU"):
        actions.check(ctx, {**form, "train.device": "cuda"})
    with pytest.raises(ValueError, match="TrainConfig.parallel = 'fsdp' is invalid: .* not lora"):
        actions.check(ctx, {**form, "train.parallel": "fsdp"})
    assert actions.check(ctx, {**form, "method": "full", "train.parallel": "fsdp"})["trainable"] > 0


def test_monitor_says_the_run_is_finishing_after_its_last_step_instead_of_eta_0s():
    from types import SimpleNamespace

    from studio.tabs.monitor import progress_html

    run = SimpleNamespace(status="running", total_steps=8, active=True, duration_s=None, reason="", name="r",
                          method="lora", model="m")
    done = progress_html(run, {"steps": 8, "total_steps": 8, "elapsed_s": 50, "eta_s": 0}, None)
    assert "final evaluation and saving" in done and "ETA" not in done
    mid = progress_html(run, {"steps": 4, "total_steps": 8, "elapsed_s": 25, "eta_s": 25}, None)
    assert "ETA" in mid and "final evaluation" not in mid
