"""The widgets of the Train tab's form, built from config help texts.

The menu itself (core's method registry: every method, each followed by its presets, e.g. LLRD = full +
TrainConfig.llrd_decay) and the form ids live in studio.actions, which has no Gradio. Every widget's value
defaults to core's dataclass default (``actions.form_defaults``); its one-line help comes from the config
dataclass field (``Cls.help()``); the units are added here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args, get_type_hints

import gradio as gr

from core.config import TrainConfig
from core.methods import spec

from .actions import BY_KEY, ENTRIES, Entry, knob_id

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
    if getattr(hint, "__origin__", None) is dict:  # name=value pairs; core's config parses and checks them
        text = ", ".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else str(default)
        return gr.Textbox(value=text, label=label, info=info, **kw)
    return gr.Textbox(value=default, label=label, info=info, **kw)


def entry_widgets(entry: Entry, **kw: Any) -> dict[str, gr.Component]:
    """Build the knob widgets of one entry (inside the caller's layout). Returns {form id: widget}, with ids
    such as "lora.r" and "llrd.train.llrd_decay" (see studio.actions)."""
    cls = spec(entry.method).config_cls
    out = {knob_id(entry.key, name): widget(cls, name, entry.defaults.get(name, dataclasses.MISSING), **kw)
           for name in entry.fields}
    for name, value in entry.train.items():
        out[knob_id(entry.key, f"train.{name}")] = widget(TrainConfig, name, value, **kw)
    return out


__all__ = ["BY_KEY", "ENTRIES", "Entry", "entry_widgets", "widget"]
