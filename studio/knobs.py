"""The Train tab's method menu and the widgets built from config help texts.

The menu is core's method registry (core.methods.menu): every registered method, each followed by its presets
(for example LLRD = full + TrainConfig.llrd_decay, layer-wise unfreezing = full + FullConfig.unfreeze_every).
Every knob's one-line help comes from the config dataclass field (``Cls.help()``); the units are added here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

import gradio as gr

from core.config import RunConfig, TrainConfig
from core.methods import menu, spec


@dataclass(frozen=True)
class Entry:
    """One item of the Train tab's method menu: a registered method, or one of its presets."""

    key: str
    label: str
    method: str  # core method name
    fields: tuple[str, ...]  # method-config fields shown
    defaults: dict[str, Any] = field(default_factory=dict)  # overrides of the config defaults
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields this entry sets (shown as knobs)
    lr: float = 2e-4  # suggested learning rate
    blurb: str = ""


def _entries() -> list[Entry]:
    out = []
    for key, (s, p) in menu().items():
        if p is None:
            out.append(Entry(key, s.label, s.name, s.knobs, lr=s.lr, blurb=s.blurb))
        else:
            out.append(Entry(key, p.label, s.name, p.fields, dict(p.method), dict(p.train), p.lr, p.blurb))
    return out


ENTRIES: list[Entry] = _entries()
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
    cls = spec(entry.method).config_cls
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
    cls = spec(entry.method).config_cls
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
    preset = spec(method).preset_for(method_cfg, train)
    return preset.key if preset is not None else method


__all__ = ["BY_KEY", "ENTRIES", "Entry", "build_config", "entry_for", "entry_widgets", "widget"]
