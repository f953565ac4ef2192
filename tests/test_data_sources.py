"""Data sources through `datasets` (core.data.sources) and the tokenised Arrow cache (core.data.cache).

Every source is checked against its .json / .jsonl equivalent: the same rows give the same token ids and labels,
the same skipped rows with the same row numbers. Nothing here reaches the network (HF_HUB_OFFLINE=1, conftest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pytest

from core import data as D
from core.__main__ import build_parser, main, resolve_train_config
from core.config import DataConfig
from core.data import load as load_module
from core.models import load_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_LEN = 128
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def examples(path, tok, **cfg):
    ex, report = D.load_examples(DataConfig(path=str(path), **cfg), tok, MAX_LEN)
    return [(e.input_ids, e.labels) for e in ex], report


def issues(report):
    return [(i.row, i.reason) for i in report.issues]


@pytest.fixture
def count_tokenising(monkeypatch):
    """Counts the rows handed to the tokenizer by load_examples."""
    calls = {"rows": 0}
    real = load_module.encode_many

    def counting(tokenizer, items, *a, **kw):
        calls["rows"] += len(items)
        return real(tokenizer, items, *a, **kw)

    monkeypatch.setattr(load_module, "encode_many", counting)
    return calls


# ---- every source gives the examples of its JSON equivalent ---------------------------------------------------


def test_csv_parquet_and_saved_dataset_equal_the_json_sample(tmp_path, tok):
    rows = json.loads((ASSETS / "instruction_sample.json").read_text(encoding="utf-8"))[:40]
    (tmp_path / "ref.json").write_text(json.dumps(rows), encoding="utf-8")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    ref, ref_report = examples(tmp_path / "ref.json", tok)
    assert len(ref) > 30
    for source, cfg in [("d.csv", {}), ("d.parquet", {}), ("saved", {}), ("dict", {"split": "test"})]:
        got, report = examples(tmp_path / source, tok, **cfg)
        assert got == ref, source
        assert (report.format, report.total_rows, report.valid_rows) == ("instruction", 40, len(ref)), source
        assert issues(report) == issues(ref_report) and report.truncated_rows == ref_report.truncated_rows, source


def test_nested_conversations_from_parquet_and_saved_dataset(tmp_path, tok):
    """Arrow gives every message every key (None where absent): a message without "name" must still be valid."""
    lines = (ASSETS / "conversation_sample.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    rows = [json.loads(line) for line in lines]
    rows[0]["messages"][0]["name"] = "only here"  # an extra key in one message: the others read None for it
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    ref, _ = examples(tmp_path / "ref.jsonl", tok)
    assert len(ref) == 20
    assert examples(tmp_path / "c.parquet", tok)[0] == ref
    assert examples(tmp_path / "saved", tok)[0] == ref


def test_csv_keeps_row_numbered_validation_and_skipped_row_report(tmp_path, tok):
    good = {"question": "What is two plus two?", "answer": "Four."}
    rows = [good, {"question": "No answer here", "answer": ""}, good, {"question": "", "answer": "x"}]
    pd.DataFrame(rows).to_csv(tmp_path / "qa.csv", index=False)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got, report = examples(tmp_path / "qa.csv", tok)
    ref, ref_report = examples(tmp_path / "qa.jsonl", tok)
    assert got == ref and len(got) == 2
    assert issues(report) == issues(ref_report) == [(2, "field 'answer' is empty"), (4, "field 'question' is empty")]
    fast = D.validate_file(tmp_path / "qa.csv")
    assert (fast.total_rows, fast.valid_rows, issues(fast)) == (4, 2, issues(report))


def test_missing_parquet_cell_reads_as_a_missing_field(tmp_path, tok):
    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye", "output": None}]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    _, report = examples(tmp_path / "d.parquet", tok)
    assert issues(report) == [(2, "missing field 'output'")]


# ---- column mapping -----------------------------------------------------------------------------------------


def test_column_mapping_renames_csv_columns(tmp_path, tok):
    rows = [{"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(1, i + 2)))} for i in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "pc.csv", index=False)
    canonical = [{"instruction": r["prompt"], "output": r["completion"]} for r in rows]
    (tmp_path / "ref.json").write_text(json.dumps(canonical), encoding="utf-8")
    ref, _ = examples(tmp_path / "ref.json", tok)
    got, report = examples(tmp_path / "pc.csv", tok, fields={"instruction": "prompt", "output": "completion"})
    assert got == ref and report.format == "instruction"
    with pytest.raises(D.DataError, match="Could not detect the dataset format: the rows have the fields"):
        examples(tmp_path / "pc.csv", tok)


def test_column_mapping_flag_and_its_validation(tmp_path):
    data = tmp_path / "pc.csv"
    data.write_text("prompt,completion\na,b\n", encoding="utf-8")
    args = build_parser().parse_args(
        ["train", "--data", str(data), "--fields", "instruction=prompt, output=completion", "--split", "train[:50%]",
         "--out", str(tmp_path / "run")]
    )
    cfg, _ = resolve_train_config(args)
    assert cfg.data.fields == {"instruction": "prompt", "output": "completion"}
    assert cfg.data.split == "train[:50%]"
    with pytest.raises(ValueError, match=r"DataConfig.fields = 'instruction' is invalid: expected name=column"):
        DataConfig.from_dict({"fields": "instruction"})
    with pytest.raises(ValueError, match=r"DataConfig.fields renames an unknown field 'prompt'"):
        DataConfig.from_dict({"fields": "prompt=instruction"})
    with pytest.raises(ValueError, match=r"DataConfig.split = 'train; rm' is invalid"):
        DataConfig(split="train; rm")


def test_saved_dataset_dict_without_the_split_names_the_splits(tmp_path, tok):
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(D.DataError, match=r"dd has no split 'validation' \(DataConfig.split\); it has train\."):
        examples(tmp_path / "dd", tok, split="validation")


def test_plain_folder_and_bad_csv_fail_in_one_sentence(tmp_path, tok):
    (tmp_path / "folder").mkdir()
    with pytest.raises(D.DataError, match="folder is a folder, but not one written by Dataset.save_to_disk"):
        examples(tmp_path / "folder", tok)
    (tmp_path / "big.csv").write_text("text\n" + "x\n" * 100, encoding="utf-8")
    with pytest.raises(D.DataError, match=r"big.csv is 0.0 MB, over the 0.0 MB limit \(DataConfig.max_bytes\)"):
        examples(tmp_path / "big.csv", tok, max_bytes=50)


# ---- Hub ids ------------------------------------------------------------------------------------------------


def test_hub_id_offline_fails_with_one_sentence_naming_it(tok, tmp_path, capsys):
    assert datasets.config.HF_HUB_OFFLINE  # conftest: tests never reach the network
    with pytest.raises(D.DataError) as err:
        examples("someone/not-cached-here", tok, split="validation")
    text = str(err.value)
    assert text == (
        "The Hugging Face Hub dataset 'someone/not-cached-here' cannot be loaded offline (HF_HUB_OFFLINE=1) because "
        "it is not in the local cache; download it once while online, or use a local file."
    )
    assert text.count(". ") == 0 and "\n" not in text
    assert main(["inspect", "--data", "someone/not-cached-here", "--quick"]) == 2  # a bad-input exit
    assert "someone/not-cached-here" in capsys.readouterr().err
    # the CLI keeps a Hub id as it is (a local path is made absolute for the worker)
    args = build_parser().parse_args(["train", "--data", "someone/set", "--out", str(tmp_path / "r")])
    assert resolve_train_config(args)[0].data.path == "someone/set"


# ---- the tokenised cache ------------------------------------------------------------------------------------


def test_cache_hit_does_not_tokenise(tmp_path, tok, count_tokenising):
    data = shutil.copy(ASSETS / "qa_sample.jsonl", tmp_path / "qa.jsonl")
    cfg = DataConfig(path=str(data))
    first, report1 = D.load_examples(cfg, tok, MAX_LEN, cache_dir=tmp_path / "cache")
    assert count_tokenising["rows"] == report1.total_rows > 0
    count_tokenising["rows"] = 0
    second, report2 = D.load_examples(cfg, tok, MAX_LEN, cache_dir=tmp_path / "cache")
    assert count_tokenising["rows"] == 0
    assert isinstance(second, D.CachedExamples)
    plain, _ = D.load_examples(cfg, tok, MAX_LEN)
    assert list(second) == list(first) == plain
    assert second[3] == plain[3] and second[-1] == plain[-1] and second[:2] == plain[:2]
    assert report2.summary() == report1.summary()
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one entry, no temporary folder left


def test_cache_keeps_the_skipped_row_report(tmp_path, tok, count_tokenising):
    rows = [{"question": "q", "answer": "a"}, "not json", {"question": "q"}, {"question": "q2", "answer": "a2"}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(path=str(data))
    _, fresh = D.load_examples(cfg, tok, MAX_LEN, cache_dir=tmp_path / "cache")
    _, cached = D.load_examples(cfg, tok, MAX_LEN, cache_dir=tmp_path / "cache")
    assert count_tokenising["rows"] == 2
    assert issues(cached) == issues(fresh) == [(2, issues(fresh)[0][1]), (3, "missing field 'answer'")]
    assert (cached.total_rows, cached.valid_rows, cached.format) == (4, 2, "qa")


def test_cache_is_invalidated_when_the_file_or_the_settings_change(tmp_path, tok, count_tokenising):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"question": "Capital of France?", "answer": "Paris"}] * 3), encoding="utf-8")
    cfg = DataConfig(path=str(data))
    before, _ = D.load_examples(cfg, tok, MAX_LEN, cache_dir=tmp_path / "cache")
    data.write_text(json.dumps([{"question": "Capital of France?", "answer": "Lyon"}] * 3), encoding="utf-8")
    count_tokenising["rows"] = 0
    after, _ = D.load_examples(cfg, tok, MAX_LEN, cache_dir=tmp_path / "cache")
    assert count_tokenising["rows"] == 3
    assert list(after) != list(before)
    assert list(after) == D.load_examples(cfg, tok, MAX_LEN)[0]
    count_tokenising["rows"] = 0
    D.load_examples(cfg, tok, 64, cache_dir=tmp_path / "cache")  # another max_len
    D.load_examples(DataConfig(path=str(data), system_prompt="Be brief."), tok, MAX_LEN, cache_dir=tmp_path / "cache")
    assert count_tokenising["rows"] == 6
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_a_source_with_no_valid_row_leaves_no_cache_entry(tmp_path, tok):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": 1}\n', encoding="utf-8")
    with pytest.raises(D.DataError, match="no valid rows"):
        D.load_examples(DataConfig(path=str(data)), tok, MAX_LEN, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_training_tokenises_into_the_run_folder_and_resume_reads_it_back(tmp_path, count_tokenising):
    from test_train import STOP_FILE, run, run_config, write_qa

    data = write_qa(tmp_path / "qa.json", n=12)
    cfg = run_config(data, max_steps=4)

    def stop_after_2(e):
        if e["type"] == "step" and e["step"] == 2:
            (tmp_path / "run" / STOP_FILE).write_text("")

    first = run(cfg, tmp_path / "run", on_event=stop_after_2)
    assert first[-1]["status"] == "stopped"
    assert count_tokenising["rows"] == 12
    entries = list((tmp_path / "run" / D.TOKENISED).iterdir())
    assert len(entries) == 1 and (entries[0] / "examples.arrow").is_file()
    second = run(cfg, tmp_path / "run", resume=True)
    assert second[0]["resumed_from"] == 2 and second[-1]["status"] == "completed"
    assert count_tokenising["rows"] == 12  # resume did not tokenise again
