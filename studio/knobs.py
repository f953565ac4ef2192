"""The Train tab's method menu (twelve entries over ten core methods) and widgets built from config help texts.

Three entries share the core method ``full``: plain full fine-tuning, LLRD (full + TrainConfig.llrd_decay) and
layer-wise unfreezing (full + FullConfig.unfreeze_every). Every knob's one-line help comes from the config
dataclass field (``Cls.help()``); the units are added here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

import gradio as gr

from core.config import METHOD_CONFIGS, RunConfig, TrainConfig


@dataclass(frozen=True)
class Entry:
    key: str
    label: str
    method: str  # core method name
    fields: tuple[str, ...]  # method-config fields shown
    defaults: dict[str, Any] = field(default_factory=dict)  # overrides of the config defaults
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields this entry sets (shown as knobs)
    lr: float = 2e-4  # suggested learning rate
    blurb: str = ""


ENTRIES: list[Entry] = [
    Entry("lora", "LoRA", "lora", ("r", "alpha", "dropout", "targets", "rslora"), lr=2e-4,
          blurb="Low-rank update B·A beside each frozen weight: y = W₀x + (α/r)·B·A·x. Small, mergeable."),
    Entry("full", "Full fine-tuning", "full", ("freeze_embeddings", "freeze_bottom", "freeze_modules"), lr=2e-5,
          blurb="Every weight trains. Best with lots of data and memory; the result is a whole model."),
    Entry("llrd", "LLRD (full + layer-wise lr decay)", "full", ("freeze_embeddings",), train={"llrd_decay": 0.9},
          lr=5e-5, blurb="Full fine-tuning where block l gets lr·decay^(L−l−1): the top learns fastest, the bottom barely moves."),
    Entry("layerwise", "Layer-wise unfreezing (full, gradual)", "full", ("unfreeze_every", "unfreeze_unit"),
          defaults={"unfreeze_every": 10}, lr=5e-5,
          blurb="Start with the top block + head, release one more block downward every k steps or epochs."),
    Entry("freeze", "Freeze (train the top N blocks)", "freeze", ("top_n", "extra_modules"), lr=1e-4,
          blurb="Partial fine-tuning: only the top N blocks (and optional modules) train."),
    Entry("bitfit", "BitFit (bias terms only)", "bitfit", ("targets", "train_norm_bias"), lr=1e-3,
          blurb="Only biases train; Llama-style linears without a bias get a zero-initialised one."),
    Entry("fishmask", "FishMask (top-k% by Fisher information)", "fishmask", ("keep_ratio", "fisher_batches"), lr=1e-4,
          blurb="Train the parameters with the largest squared gradients; every other gradient is masked."),
    Entry("adapter", "Adapter (bottleneck)", "adapter", ("bottleneck", "placement", "activation"), lr=1e-3,
          blurb="x + W_up·act(W_down·x) inserted after attention and/or FFN; starts as the identity."),
    Entry("prompt_tuning", "Prompt tuning", "prompt_tuning", ("num_virtual_tokens", "init", "init_text"), lr=3e-2,
          blurb="m trainable soft tokens in front of the input; the model itself is untouched."),
    Entry("prefix_tuning", "Prefix tuning", "prefix_tuning", ("num_virtual_tokens", "encoder_hidden"), lr=1e-2,
          blurb="Trainable key/value prefixes in every layer, produced by an MLP while training."),
    Entry("p_tuning", "P-Tuning v1", "p_tuning", ("num_virtual_tokens", "encoder_type", "encoder_hidden"), lr=1e-2,
          blurb="Input-layer virtual tokens produced by a prompt encoder (LSTM+MLP or MLP)."),
    Entry("p_tuning_v2", "P-Tuning v2 (deep prompts)", "p_tuning_v2", ("num_virtual_tokens",), lr=1e-2,
          blurb="Prompts in every layer, trained directly (no reparameterisation)."),
]
BY_KEY = {e.key: e for e in ENTRIES}

UNITS = {
    "r": "rank", "alpha": "scale", "dropout": "probability", "bottleneck": "units", "num_virtual_tokens": "tokens",
    "encoder_hidden": "units", "top_n": "blocks", "freeze_bottom": "blocks", "unfreeze_every": "steps or epochs",
    "keep_ratio": "fraction of all parameters", "fisher_batches": "batches", "llrd_decay": "factor per block",
    "lr": "per step", "epochs": "passes", "max_steps": "optimiser steps", "batch_size": "examples",
    "grad_accum": "micro-batches", "max_len": "tokens", "warmup_steps": "steps", "weight_decay": "AdamW",
    "max_grad_norm": "L2 norm", "eval_every": "steps", "save_every": "steps", "log_every": "steps", "seed": "",
}
CHOICES = {
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all-linear"],
    "extra_modules": ["norm", "lm_head", "embed_tokens"],
}
TRAIN_MAIN = ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "scheduler", "warmup_steps", "eval_every")
TRAIN_ADVANCED = ("weight_decay", "max_grad_norm", "save_every", "log_every", "seed", "device", "grad_checkpointing")


def _title(name: str) -> str:
    text = name.replace("_", " ")
    return text[0].upper() + text[1:]


def widget(cls: type, name: str, value: Any = dataclasses.MISSING, **kw: Any) -> gr.Component:
    """A widget for one config field: number widgets for numbers, radio/dropdown for choices, with help + unit."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    hint = get_type_hints(cls)[name]
    default = value if value is not dataclasses.MISSING else (
        f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    )
    unit = UNITS.get(name, "")
    label = _title(name) + (f" ({unit})" if unit else "")
    info = f.metadata.get("help", "")
    if getattr(hint, "__origin__", None) is Literal:
        choices = list(get_args(hint))
        if len(choices) <= 4:
            return gr.Radio(choices, value=default, label=label, info=info, **kw)
        return gr.Dropdown(choices, value=default, label=label, info=info, **kw)
    if hint is bool:
        return gr.Checkbox(value=default, label=label, info=info, **kw)
    if hint in (int, float):
        # No minimum/maximum on the widget: the config's own check names the field and the allowed range.
        lo, gt, hi = f.metadata.get("min"), f.metadata.get("gt"), f.metadata.get("max")
        rng = [f"≥ {lo:g}" if lo is not None else "", f"> {gt:g}" if gt is not None else "",
               f"≤ {hi:g}" if hi is not None else ""]
        rng = ", ".join(r for r in rng if r)
        return gr.Number(value=default, label=label, info=f"{info} ({rng})" if rng else info,
                         precision=0 if hint is int else None, **kw)
    if getattr(hint, "__origin__", None) is list:
        if name in CHOICES:
            return gr.Dropdown(CHOICES[name], value=list(default), multiselect=True, allow_custom_value=True,
                               label=label, info=info, **kw)
        return gr.Textbox(value=", ".join(default), label=label, info=info + " Comma-separated.", **kw)
    return gr.Textbox(value=default, label=label, info=info, **kw)


def entry_widgets(entry: Entry, **kw: Any) -> list[tuple[str, gr.Component]]:
    """Build the knob widgets of one entry (inside the caller's layout). Returns [(field, widget)]."""
    cls = METHOD_CONFIGS[entry.method]
    out = [(name, widget(cls, name, entry.defaults.get(name, dataclasses.MISSING), **kw)) for name in entry.fields]
    for name, value in entry.train.items():
        out.append((f"train.{name}", widget(TrainConfig, name, value, **kw)))
    return out


def _coerce(value: Any, hint: Any) -> Any:
    if getattr(hint, "__origin__", None) is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return list(value or [])
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def build_config(
    entry_key: str, knob_values: dict[tuple[str, str], Any], train_values: dict[str, Any], model: str, data: dict
) -> RunConfig:
    """The typed RunConfig from the form. ValueError names the field when a value is missing or invalid."""
    entry = BY_KEY.get(entry_key)
    if entry is None:
        raise ValueError(f"Method: choose one of {', '.join(e.label for e in ENTRIES)}")
    cls = METHOD_CONFIGS[entry.method]
    hints = get_type_hints(cls)
    values: dict[str, Any] = dict(entry.defaults)
    train = {k: v for k, v in train_values.items()}
    for (key, name), value in knob_values.items():
        if key != entry.key:
            continue
        if value is None:
            raise ValueError(f"{_title(name.removeprefix('train.'))}: enter a value")
        if name.startswith("train."):
            train[name[6:]] = value
        else:
            values[name] = _coerce(value, hints[name])
    train.setdefault("llrd_decay", 1.0)
    for name, value in train.items():
        if value is None:
            raise ValueError(f"{_title(name)}: enter a value")
    thints = get_type_hints(TrainConfig)
    train = {k: _coerce(v, thints[k]) for k, v in train.items()}
    return RunConfig.from_dict({
        "model": model, "method": entry.method, "method_config": values, "train": train, "data": data,
    })


def entry_for(method: str, method_cfg: dict[str, Any], train: dict[str, Any]) -> str:
    """The menu entry of a (core method, knobs) pair, e.g. full + llrd_decay 0.9 -> 'llrd'."""
    if method == "full":
        if float(train.get("llrd_decay", 1.0)) < 1.0:
            return "llrd"
        if int(method_cfg.get("unfreeze_every", 0) or 0) > 0:
            return "layerwise"
    return method


__all__ = ["BY_KEY", "ENTRIES", "Entry", "build_config", "entry_for", "entry_widgets", "widget"]
