"""Bad input (issue 6), engine and CLI side: hyperparameters, dataset files and chat prompts.

Every bad hyperparameter is refused with the field named, through the CLI (exit 2, one ``error:`` line) and
the Python API (ValueError), before any work starts: no model weights or dataset are loaded, no run folder is
written. Settings that depend on the model (LoRA rank vs layer size, unknown targets, prompt length vs context)
are checked against the model's config alone (core.train.preflight).

Dataset files: core.data's own tests (test_data.py) cover the API messages; here they go through ``inspect``
and ``train``, where a bad file must fail before the model loads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers

import core.train as train_mod
from core.__main__ import main
from core.config import RunConfig
from core.generate import GenerationSettings, stream
from core.preflight import preflight
from core.train import train
from test_cli import ROOT, cli, tiny  # noqa: F401 - tiny: the module fixture (tiny model folder, qa.json)
from test_train import tiny_lm, tokenizer

# ---- hyperparameters -----------------------------------------------------------------------------------------

# (CLI flags, the field the message must name, the same setting as the studio's config dict)
CONFIG_CASES = [
    (["--lr", "0"], "TrainConfig.lr", {"train": {"lr": 0}}),
    (["--lr", "-0.001"], "TrainConfig.lr", {"train": {"lr": -0.001}}),
    (["--lr", "5"], "TrainConfig.lr", {"train": {"lr": 5}}),  # absurd: more than 1
    (["--lr", "nan"], "TrainConfig.lr", {"train": {"lr": float("nan")}}),
    (["--r", "0"], "LoraConfig.r", {"method": "lora", "method_config": {"r": 0}}),
    (["--batch-size", "0"], "TrainConfig.batch_size", {"train": {"batch_size": 0}}),
    (["--llrd-decay", "0"], "TrainConfig.llrd_decay", {"train": {"llrd_decay": 0}}),
    (["--llrd-decay", "1.5"], "TrainConfig.llrd_decay", {"train": {"llrd_decay": 1.5}}),
    (["--llrd-decay", "-0.9"], "TrainConfig.llrd_decay", {"train": {"llrd_decay": -0.9}}),
    (["--method", "prompt_tuning", "--num-virtual-tokens", "0"], "PromptTuningConfig.num_virtual_tokens",
     {"method": "prompt_tuning", "method_config": {"num_virtual_tokens": 0}}),
    (["--method", "prefix_tuning", "--num-virtual-tokens", "0"], "PrefixTuningConfig.num_virtual_tokens",
     {"method": "prefix_tuning", "method_config": {"num_virtual_tokens": 0}}),
    (["--method", "p_tuning_v2", "--num-virtual-tokens", "0"], "PTuningV2Config.num_virtual_tokens",
     {"method": "p_tuning_v2", "method_config": {"num_virtual_tokens": 0}}),
]

# settings that only the model's shape can refuse (tiny model: hidden 32, 2 blocks, 256 positions)
SHAPE_CASES = [
    (["--r", "33"], "LoraConfig.r = 33 is invalid: must be <= min(in, out) = 32",
     {"method": "lora", "method_config": {"r": 33}}),
    (["--targets", "q_proj,attn"], "LoraConfig.targets: no module named 'attn'; available: q_proj, k_proj, v_proj, "
     "o_proj, gate_proj, up_proj, down_proj, or 'all-linear'",
     {"method": "lora", "method_config": {"targets": ["attn"]}}),
    (["--method", "bitfit", "--targets", "c_attn"], "BitFitConfig.targets: no module named 'c_attn'; available: q_proj",
     {"method": "bitfit", "method_config": {"targets": ["c_attn"]}}),
    (["--method", "prefix_tuning", "--num-virtual-tokens", "256"],
     "PrefixTuningConfig.num_virtual_tokens = 256 is invalid: must be between 1 and 255",
     {"method": "prefix_tuning", "method_config": {"num_virtual_tokens": 256}}),
    (["--method", "prompt_tuning", "--num-virtual-tokens", "5000"],
     "PromptTuningConfig.num_virtual_tokens = 5000 is invalid: must be between 1 and 255",
     {"method": "prompt_tuning", "method_config": {"num_virtual_tokens": 5000}}),
    (["--method", "freeze", "--top-n", "3"], "FreezeConfig.top_n = 3 is invalid: the model has only 2 blocks",
     {"method": "freeze", "method_config": {"top_n": 3}}),
]


def _ids(x):
    return " ".join(x) if isinstance(x, list) else None


@pytest.fixture
def no_work(monkeypatch):
    """Records (and refuses) any loading of weights, tokenizer or dataset: the checks must come first."""
    calls: list[str] = []

    def refuse(what):
        def f(*a, **kw):
            calls.append(what)
            raise AssertionError(f"{what} was called before the bad setting was refused")
        return f

    for name in ("load_model", "load_tokenizer", "load_examples"):
        monkeypatch.setattr(train_mod, name, refuse(name))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("from_pretrained"))
    return calls


def run_cli_in_process(capsys, *argv: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    rc = main(list(argv))
    return rc, capsys.readouterr().err, time.perf_counter() - start


def assert_one_line(err: str, *needles: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def config_dict(model: str, data: Path, extra: dict) -> dict:
    d = {"model": model, "method": "lora", "method_config": {}, "train": {"max_steps": 1, "max_len": 64},
         "data": {"path": str(data), "val_fraction": 0}}
    for k, v in extra.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) else v
    return d


@pytest.mark.parametrize("flags, field, values", CONFIG_CASES, ids=_ids)
def test_bad_hyperparameter_is_refused_naming_the_field(tiny, tmp_path, capsys, no_work, flags, field, values):
    model_dir, data = tiny
    run = tmp_path / "run"
    rc, err, _ = run_cli_in_process(capsys, "train", "--model", str(model_dir), "--data", str(data), *flags,
                                    "--out", str(run))
    assert rc == 2
    assert_one_line(err, field)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RunConfig.from_dict(config_dict(str(model_dir), data, values))
    assert not run.exists() and not no_work


@pytest.mark.parametrize("flags, message, values", SHAPE_CASES, ids=_ids)
def test_setting_that_does_not_fit_the_model_is_refused_before_loading(tiny, tmp_path, capsys, no_work, flags,
                                                                        message, values):
    model_dir, data = tiny
    run = tmp_path / "run"
    rc, err, elapsed = run_cli_in_process(capsys, "train", "--model", str(model_dir), "--data", str(data), *flags,
                                          "--max-len", "64", "--out", str(run))
    assert rc == 2
    assert_one_line(err, message)
    assert elapsed < 15, elapsed  # only the model's config was read
    assert not run.exists()

    cfg = RunConfig.from_dict(config_dict(str(model_dir), data, values))  # a valid config on its own
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        next(iter(train(cfg, run)))
    with pytest.raises(ValueError, match="^" + re.escape(message)):  # a model passed in: the same check
        next(iter(train(cfg, run, model=tiny_lm(), tokenizer=tokenizer())))
    assert not run.exists() and not no_work


def test_preflight_accepts_what_fits():
    for values in ({"method": "lora", "method_config": {"r": 16, "targets": ["all-linear"]}},
                   {"method": "prefix_tuning", "method_config": {"num_virtual_tokens": 255}},
                   {"method": "full", "method_config": {"freeze_bottom": 1}},
                   {"method": "freeze", "method_config": {"top_n": 2}}):
        preflight(RunConfig.from_dict(config_dict("tiny", Path("x.json"), values)), model=tiny_lm())


def test_bad_settings_exit_2_in_a_real_process(tiny, tmp_path):
    model_dir, data = tiny
    p = cli("train", "--model", str(model_dir), "--data", str(data), "--targets", "q_proj,nope", "--out",
            str(tmp_path / "run"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: LoraConfig.targets: no module named 'nope'; available: q_proj, k_proj")
    assert not (tmp_path / "run").exists()


# ---- dataset files through inspect and train -----------------------------------------------------------------

BAD_FILES = {
    "malformed.json": (b'[{"question": "a", "answer": "b"}, {"question": }]', "is not valid JSON: Expecting value"),
    "object.json": (b'{"question": "a", "answer": "b"}', "holds an object, not a list of objects"),
    "numbers.json": (b"[1, 2, 3]", "is a list of numbers, not a list of objects"),
    "wrong_types.jsonl": (b'{"question": 1, "answer": ["x"]}\n{"question": true, "answer": "y"}\n',
                          "no valid rows for the qa format .* row 1: field 'question' must be a string, got a number"),
    "all_invalid.jsonl": (b'{"instruction": "a", "output": ""}\n{"instruction": "", "output": "b"}\n',
                          "no valid rows for the instruction format .* row 1: field 'output' is empty"),
    "empty.json": (b"", r"is empty \(0 bytes\)"),
    "binary.json": (bytes(range(256)) * 4, "looks like a binary file"),
    "latin1.jsonl": ('{"question": "caf\xe9", "answer": "x"}\n'.encode("latin-1"),
                     r"is not valid UTF-8 text \(byte 0xe9 on line 1\)"),
    "big.jsonl": (json.dumps({"question": "q" * 3000, "answer": "a"}).encode(),
                  r"over the 0.0 MB limit \(DataConfig.max_bytes\)"),  # with --max-bytes 2000
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_dataset_file_fails_inspect_and_train_in_one_line(tiny, tmp_path, capsys, monkeypatch, name):
    model_dir, _ = tiny
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    limit = ["--max-bytes", "2000"]
    rc, err, _ = run_cli_in_process(capsys, "inspect", "--data", str(path), "--model", str(model_dir), *limit)
    assert rc == 2 and re.search(message, err), err
    assert_one_line(err, name)

    loaded: list[str] = []
    monkeypatch.setattr(train_mod, "load_model", lambda *a, **kw: loaded.append("model"))
    run = tmp_path / "run"
    rc, err, _ = run_cli_in_process(capsys, "train", "--model", str(model_dir), "--data", str(path), *limit,
                                    "--max-steps", "1", "--out", str(run))
    assert rc == 2 and re.search(message, err), err
    assert_one_line(err, name)
    assert not loaded  # the dataset is read before the model
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    assert not (run / "checkpoints").exists() and not (run / "adapter").exists()


def test_rows_of_the_wrong_type_are_reported_and_the_rest_used(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"question": "a?", "answer": "b"}\n{"question": 7, "answer": "c"}\n'
                    '{"question": "d?", "answer": {"x": 1}}\n{"question": "e?", "answer": "f"}\n')
    rc = main(["inspect", "--data", str(path), "--model", str(model_dir)])
    out = capsys.readouterr().out
    assert rc == 0 and "4 rows, 2 valid, 2 skipped" in out
    assert "row 2: field 'question' must be a string, got a number" in out
    assert "row 3: field 'answer' must be a string, got an object" in out


def test_a_million_tiny_rows_validate_in_bounded_time_and_memory(tmp_path):
    path = tmp_path / "million.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(1_000_000))
    # VmHWM is this process's own peak; ru_maxrss would also count the (large) pytest parent it was forked from
    code = ("import sys; from core.__main__ import main; rc = main(sys.argv[1:]); "
            "peak_kb = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]); "
            "print('maxrss_kb', peak_kb(), file=sys.stderr); sys.exit(rc)")
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, "inspect", "--data", str(path), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    elapsed = time.perf_counter() - start
    assert p.returncode == 0, p.stderr
    assert "1000000 rows, 1000000 valid" in p.stdout
    rss_mb = int(p.stderr.split("maxrss_kb")[1].split()[0]) / 1024
    assert rss_mb < 600, f"peak RSS {rss_mb:.0f} MB"  # streamed: the 40 MB file is never held as 1M objects
    assert elapsed < 90, f"{elapsed:.1f} s"  # about 5 s of validation on one core, plus the imports


def test_a_ten_megabyte_string_is_truncated_in_bounded_time(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"question": "why?", "answer": "because " * 1_300_000}) + "\n"
                    + json.dumps({"question": "short?", "answer": "yes"}) + "\n")
    assert path.stat().st_size > 10_000_000
    start = time.perf_counter()
    assert main(["inspect", "--data", str(path), "--model", str(model_dir), "--max-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "2 rows, 2 valid" in out and "1 rows are longer than max_len and were truncated (rows 1)" in out
    assert main(["train", "--model", str(model_dir), "--data", str(path), "--max-len", "64", "--max-steps", "1",
                 "--val-fraction", "0", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert time.perf_counter() - start < 30


# ---- chat prompts --------------------------------------------------------------------------------------------


def test_empty_prompt_is_refused(tiny, capsys, monkeypatch):
    model_dir, _ = tiny
    for content in ("", "   \n\t"):
        with pytest.raises(ValueError, match="the prompt is empty"):
            stream(tiny_lm(), tokenizer(), None, [{"role": "user", "content": content}])
    loaded: list[str] = []
    monkeypatch.setattr("core.models.load_model", lambda *a, **kw: loaded.append("model"))
    rc, err, _ = run_cli_in_process(capsys, "generate", "--run", str(model_dir), "--base", "--prompt", " ")
    assert rc == 2 and not loaded
    assert_one_line(err, "--prompt is empty")


def test_hundred_thousand_character_prompt_is_truncated_and_the_user_told(tiny, capsys):
    model_dir, _ = tiny
    prompt = "x y " * 25_000 + "the end"
    assert len(prompt) > 100_000
    s = stream(tiny_lm(), tokenizer(), None, [{"role": "user", "content": prompt}],
               GenerationSettings(temperature=0.0, max_new_tokens=4))
    list(s)
    assert len(s.prompt_ids) == 256 - 4 and "only its last 252 tokens were used" in s.notice
    assert tokenizer().decode(s.prompt_ids).endswith("the end<|im_end|>\n<|im_start|>assistant\n")
    rc = main(["generate", "--run", str(model_dir), "--base", "--model", str(model_dir), "--prompt", prompt,
               "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0 and err.startswith("note: The prompt is longer than the model's context (256 tokens")
