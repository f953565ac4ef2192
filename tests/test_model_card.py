"""Model cards: every export carries a README.md with the run's own facts, in Hugging Face's front-matter form."""

import json

import yaml

from core.__main__ import main
from test_train import save_tiny_lm, write_qa


def _front(text):
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_cli_exports_carry_a_card_with_the_runs_facts(tmp_path, capsys):
    model_dir, data = save_tiny_lm(tmp_path / "model", init=0.5), write_qa(tmp_path / "qa.json", n=12)
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--method", "lora", "--r", "4",
                 "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--max-len", "64", "--out", str(run)]) == 0
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    eval_loss = [e for e in events if e["type"] == "eval"][-1]["eval_loss"]

    assert main(["export", "--run", str(run), "--out", str(tmp_path / "a")]) == 0
    front, body = _front((tmp_path / "a" / "README.md").read_text())
    assert front == {"base_model": str(model_dir), "library_name": "peft", "license": "other",
                     "pipeline_tag": "text-generation", "tags": ["peft-studio", "lora"]}
    assert "- method: `lora` (LoRA)" in body and "- r: `4`" in body
    assert f"- trainable parameters: {start['trainable']:,}" in body
    assert "- file: `qa.json`" in body and f"- rows: 12 ({start['train_examples']} train" in body
    assert "- steps: 3" in body and "- learning rate: 0.05" in body and "- hardware: cpu x1" in body
    assert f"- eval_loss: {eval_loss:.4g}" in body
    assert "PeftModel.from_pretrained(base" in body

    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m"), "--merge"]) == 0
    front, body = _front((tmp_path / "m" / "README.md").read_text())
    assert front["library_name"] == "transformers" and "merged" in front["tags"]
    assert "AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")" in body


def test_a_default_model_card_names_the_real_base_and_its_license(tmp_path):
    from core.model_card import model_card

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "peft_studio.json").write_text(json.dumps({"method": "prompt_tuning", "base_model": "default",
                                                         "method_config": {"num_virtual_tokens": 20}}))
    front, body = _front(model_card(folder, merged=False))
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert "## Data" not in body  # no run around it: nothing guessed
