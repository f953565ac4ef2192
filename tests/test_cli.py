"""The CLI (python -m core): train -> generate -> export on a tiny model folder, flags vs config files, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.__main__ import build_parser, main, resolve_train_config
from core.checkpoint import load_adapter
from core.config import RunConfig
from core.forward import logits
from core.generate import GenerationSettings, generate
from core.models import load_model
from test_train import save_tiny_lm, write_qa

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return save_tiny_lm(d / "model", init=0.5), write_qa(d / "qa.json", n=12)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_train_generate_export_round_trip(tiny, tmp_path, capsys):
    model_dir, data = tiny
    run = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--data", str(data), "--method", "lora", "--r", "4",
               "--targets", "q_proj,v_proj,o_proj", "--max-steps", "3", "--batch-size", "4", "--lr", "0.05",
               "--max-len", "64", "--out", str(run)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "step 3/3" in out and "completed" in err
    cfg = RunConfig.load(run / "config.yaml")  # the resolved config
    assert cfg.method_name == "lora" and cfg.method.targets == ["q_proj", "v_proj", "o_proj"] and cfg.method.r == 4
    assert cfg.train.lr == 0.05 and cfg.train.max_steps == 3 and cfg.model == str(model_dir)
    assert json.loads((run / "status.json").read_text())["status"] == "completed"

    # generate: the CLI's greedy reply is the library's
    rc = main(["generate", "--run", str(run), "--prompt", "What is 2 times three?", "--temperature", "0",
               "--max-new-tokens", "8", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    model, tok = load_model(str(model_dir), device="cpu")
    method = load_adapter(model, run / "adapter")
    settings = GenerationSettings(temperature=0.0, max_new_tokens=8)
    expected = generate(model, tok, method, [{"role": "user", "content": "What is 2 times three?"}], settings)
    assert out == expected + "\n" and expected.strip()

    # export: the adapter as is, and merged into a plain HF model with the same logits
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "adapter_copy")]) == 0
    assert {p.name for p in (tmp_path / "adapter_copy").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "peft_studio.json", "README.md"}
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 400, 500, 600, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, logits(model, method, ids), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_prompt_methods_cannot_be_merged_and_say_so(tiny, tmp_path, capsys):
    model_dir, data = tiny
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--method", "prompt_tuning",
                 "--num-virtual-tokens", "3", "--init", "random", "--max-steps", "1", "--max-len", "64",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    rc = main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--merge"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "cannot be merged" in err and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--lr", "fast"], "lr"),
        (["--lr", "-1"], "lr"),
        (["--r", "0"], "r"),
        (["--batch-size", "0"], "batch_size"),
        (["--scheduler", "sometimes"], "scheduler"),
        (["--method", "adapter", "--placement", "sideways"], "placement"),
        (["--method", "nope"], "method"),
        (["--bottleneck", "8"], "bottleneck"),  # a knob of another method
    ],
)
def test_bad_flag_values_name_the_field(tmp_path, capsys, flags, field):
    rc = main(["train", "--data", "x.json", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and field in err


def test_bad_flag_exits_2_in_a_real_process(tmp_path):
    p = cli("train", "--data", "x.json", "--out", str(tmp_path / "run"), "--lr", "fast")
    assert p.returncode == 2 and p.stderr.strip() == "error: TrainConfig.lr = 'fast' is invalid: expected float"
    p = cli("train", "--no-such-flag")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1
    p = cli("generate", "--run", str(tmp_path / "missing"), "--prompt", "hi")
    assert p.returncode == 2 and "missing" in p.stderr and p.stderr.count("\n") == 1


def test_flags_override_the_config_file(tmp_path):
    cfg = RunConfig.from_dict({"method": "lora", "method_config": {"r": 16, "alpha": 32},
                               "train": {"lr": 1e-3, "epochs": 2}, "data": {"path": "/data/a.json"}})
    cfg.save(tmp_path / "config.yaml")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "config.yaml"), "--lr", "0.01", "--r", "4",
                                      "--rslora"])
    resolved, run_dir = resolve_train_config(args)
    assert run_dir == tmp_path  # the config's folder is the run folder
    assert resolved.train.lr == 0.01 and resolved.train.epochs == 2
    assert resolved.method.r == 4 and resolved.method.alpha == 32 and resolved.method.rslora is True
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "config.yaml"), "--method", "adapter",
                                      "--bottleneck", "8", "--out", str(tmp_path / "other")])
    resolved, run_dir = resolve_train_config(args)
    assert resolved.method_name == "adapter" and resolved.method.bottleneck == 8 and run_dir == tmp_path / "other"


def test_inspect_prints_format_report_and_lengths(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye"}, {"instruction": "Count", "input": "1 2", "output": "3"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["inspect", "--data", str(tmp_path / "d.jsonl"), "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "format: instruction" in out and "3 rows, 2 valid" in out and "row 2" in out and "p90" in out


def test_sigterm_stops_a_worker_cleanly(tiny, tmp_path):
    """What the studio's job queue does: SIGTERM the worker; it saves a usable adapter and exits 0."""
    model_dir, data = tiny
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "core", "train", "--model", str(model_dir), "--data", str(data), "--max-steps", "100000",
         "--max-len", "64", "--out", str(run)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and '"type": "step"' in metrics.read_text():
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped" and "SIGTERM" in status["reason"]
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "checkpoints").is_dir()
