"""Model cards: the README.md that every exported adapter and merged folder carries (Hugging Face's convention).

    card = model_card(Path("runs/quill/adapter"), merged=False)

A card is YAML front matter (``base_model``, ``library_name``, ``license``, ``tags``, ``pipeline_tag``) and a short
text: the base model; the method and its knobs; the data (file name, rows, format); the training (steps, lr,
wall time, hardware); the evaluation metrics; how to load it; the license. Everything is read from what the run
wrote (the adapter's ``peft_studio.json``, the run's ``config.yaml`` and ``metrics.jsonl``): a fact the run did
not record is left out, never guessed. An adapter folder exported on its own (no run around it) still gets the
base model, the method and the loading snippet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULT_MODEL, RunConfig
from .methods import spec

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged default model is
LICENSES = {DEFAULT_MODEL: "apache-2.0", DEFAULT_MODEL_ID: "apache-2.0"}  # known base-model licenses


def run_facts(adapter_folder: Path) -> dict[str, Any]:
    """What the run around ``adapter_folder`` recorded: config, the start event, the last step and eval events."""
    facts: dict[str, Any] = {"sidecar": json.loads((adapter_folder / "peft_studio.json").read_text(encoding="utf-8"))}
    run = adapter_folder.parent
    if adapter_folder.name != "adapter" or not (run / "config.yaml").is_file():
        return facts
    try:
        facts["config"] = RunConfig.load(run / "config.yaml")
    except (OSError, ValueError):
        return facts
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("type") in ("start", "step", "eval", "end"):
            facts[e["type"]] = e
    return facts


def model_card(adapter_folder: str | Path, merged: bool) -> str:
    """The README.md text for an export of ``adapter_folder`` (``merged``: folded into a plain HF model)."""
    facts = run_facts(Path(adapter_folder))
    side = facts["sidecar"]
    s = spec(side["method"])
    base = DEFAULT_MODEL_ID if side.get("base_model") in (None, DEFAULT_MODEL) else str(side["base_model"])
    license_ = LICENSES.get(base, "other")
    peft_format = bool(s.peft_type) and not merged
    front = {
        "base_model": base,
        "library_name": "peft" if peft_format else "transformers",
        "license": license_,
        "pipeline_tag": "text-generation",
        "tags": ["peft-studio", s.name] + ([] if not merged else ["merged"]),
    }
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    title = f"{s.label} of {base}" + (", merged" if merged else "")
    out += [f"# {title}", "", f"Fine-tuned with PEFT Studio. {s.blurb}", ""]

    out += ["## Method", "", f"- method: `{s.name}` ({s.label})"]
    out += [f"- {k}: `{v}`" for k, v in (side.get("method_config") or {}).items()]
    start = facts.get("start") or {}
    if start.get("trainable") and start.get("total_params"):
        pct = 100 * start["trainable"] / start["total_params"]
        out.append(f"- trainable parameters: {start['trainable']:,} of {start['total_params']:,} ({pct:.3g}%)")
    out.append("")

    cfg: RunConfig | None = facts.get("config")
    if cfg is not None:
        rows = [start[k] for k in ("train_examples", "val_examples") if isinstance(start.get(k), int)]
        out += ["## Data", "", f"- file: `{Path(cfg.data.path).name}`"]
        if len(rows) == 2:
            out.append(f"- rows: {sum(rows)} ({rows[0]} train, {rows[1]} held out)")
        fmt = start.get("data_format") or cfg.data.format
        out += [f"- format: {fmt}", ""]
        step, end = facts.get("step") or {}, facts.get("end") or {}
        t = cfg.train
        out += ["## Training", "", f"- steps: {step.get('step', end.get('step', '?'))}",
                f"- learning rate: {t.lr:g} ({t.scheduler}, warmup {t.warmup_steps})",
                f"- batch size: {t.batch_size} x {t.grad_accum} accumulation, max_len {t.max_len}, seed {t.seed}"]
        if t.llrd_decay < 1:
            out.append(f"- layer-wise lr decay: {t.llrd_decay:g}")
        if step.get("elapsed_s") is not None:
            out.append(f"- wall time: {step['elapsed_s']:.0f} s")
        if start.get("device"):
            out.append(f"- hardware: {start['device']} x{start.get('world_size', 1)}")
        if end.get("status"):
            out.append(f"- ended: {end['status']}")
        out.append("")
        ev = facts.get("eval") or {}
        metrics = {k: v for k, v in ev.items() if k not in ("type", "step") and isinstance(v, (int, float))}
        if metrics:
            out += ["## Evaluation", "", f"On the {rows[1] if len(rows) == 2 else ''} held-out rows, at step "
                    f"{ev.get('step')}:", ""] + [f"- {k}: {v:.4g}" for k, v in metrics.items()] + [""]

    out += ["## How to load", "", "```python"]
    if merged:
        out += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")",
                "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")"]
    elif peft_format:
        out += ["from peft import PeftModel",
                "from transformers import AutoModelForCausalLM",
                f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")",
                "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")"]
    else:
        out += ["# this method has no PEFT format; PEFT Studio's engine loads it",
                "from core.checkpoint import load_adapter",
                "from core.models import load_model",
                f"model, tokenizer = load_model(\"{side.get('base_model') or DEFAULT_MODEL}\")",
                "method = load_adapter(model, \"path/to/this/folder\")"]
    out += ["```", "", "## License", "", f"`{license_}`" + (", as the base model" if license_ != "other" else
                                                          ": see the base model's license"), ""]
    return "\n".join(out)


def write_model_card(folder: str | Path, adapter_folder: str | Path, merged: bool) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(adapter_folder, merged), encoding="utf-8")
    return path


__all__ = ["model_card", "run_facts", "write_model_card"]
