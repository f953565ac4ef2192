"""The widgets of the Train tab's form, built from config help texts.

The menu itself (core's method registry: every method, each followed by its presets, e.g. LLRD = full +
TrainConfig.llrd_decay) and the form ids live in studio.actions, which has no Gradio. Every widget's value
defaults to core's dataclass default (``actions.form_defaults``); its one-line help comes from the config
dataclass field (``help`` / ``help_zh`` in its metadata); labels with their units are locale entries
``field.<name>`` (studio/locales).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args, get_type_hints

import gradio as gr

from core.config import DataConfig, TrainConfig
from core.methods import spec

from .actions import BY_KEY, DATA_FORM, ENTRIES, TRAIN_FORM, Entry, knob_id
from .i18n import T, help_key

CHOICES = {
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all-linear"],
    "extra_modules": ["norm", "lm_head", "embed_tokens"],
}
#: A list field without CHOICES is a comma-separated text box; its help says so.
COMMA = {"en": " Comma-separated.", "zh": "（逗号分隔）"}


def shown_fields() -> list[tuple[type, str, dataclasses.Field]]:
    """(config class, field name, field) of every config field the studio shows as a widget, once each."""
    out, seen = [], set()
    wanted = [(TrainConfig, n) for n in TRAIN_FORM] + [(DataConfig, n) for n in DATA_FORM if n != "path"]
    for e in ENTRIES:
        wanted += [(spec(e.method).config_cls, n) for n in e.fields]
        wanted += [(TrainConfig, n) for n in e.train]
    for cls, name in wanted:
        if (cls, name) not in seen:
            seen.add((cls, name))
            out.append((cls, name, {x.name: x for x in dataclasses.fields(cls)}[name]))
    return out


def info_text(cls: type, name: str, lang: str) -> str:
    """A field's one-line help in ``lang`` (metadata help / help_zh), with its allowed range for numbers."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    hint = get_type_hints(cls)[name]
    text = f.metadata.get("help" if lang == "en" else f"help_{lang}", "")
    if hint in (int, float) and hint is not bool:
        lo, gt, hi = f.metadata.get("min"), f.metadata.get("gt"), f.metadata.get("max")
        rng = ", ".join(r for r in (f"≥ {lo:g}" if lo is not None else "", f"> {gt:g}" if gt is not None else "",
                                    f"≤ {hi:g}" if hi is not None else "") if r)
        if rng:
            text += f" ({rng})" if lang == "en" else f"（{rng}）"
    if getattr(hint, "__origin__", None) is list and name not in CHOICES:
        text += COMMA[lang]
    return text


def pairs_text(value: Any) -> str:
    """A dict field as its text box shows it ("instruction=prompt, output=completion"); core parses it back."""
    return ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def widget(cls: type, name: str, value: Any = dataclasses.MISSING, **kw: Any) -> gr.Component:
    """A widget for one config field: number widgets for numbers, radio/dropdown for choices, with help + unit.

    The label is the locale entry ``field.<name>`` (its unit included); the help is the generated key
    ``help.<Class>.<name>`` (studio.i18n: core's help / help_zh and the allowed range)."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    hint = get_type_hints(cls)[name]
    default = value if value is not dataclasses.MISSING else (
        f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    )
    label, info = T(f"field.{name}"), T(help_key(cls, name))
    if getattr(hint, "__origin__", None) is Literal:
        choices = list(get_args(hint))
        if len(choices) <= 4:
            return gr.Radio(choices, value=default, label=label, info=info, **kw)
        return gr.Dropdown(choices, value=default, label=label, info=info, **kw)
    if hint is bool:
        return gr.Checkbox(value=default, label=label, info=info, **kw)
    if hint in (int, float):
        # No minimum/maximum on the widget: the config's own check names the field and the allowed range.
        return gr.Number(value=default, label=label, info=info, precision=0 if hint is int else None, **kw)
    if getattr(hint, "__origin__", None) is list:
        if name in CHOICES:
            return gr.Dropdown(CHOICES[name], value=list(default), multiselect=True, allow_custom_value=True,
                               label=label, info=info, **kw)
        return gr.Textbox(value=", ".join(default), label=label, info=info, **kw)
    if getattr(hint, "__origin__", None) is dict:  # name=value pairs; core's config parses and checks them
        return gr.Textbox(value=pairs_text(default), label=label, info=info, **kw)
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


__all__ = ["BY_KEY", "ENTRIES", "Entry", "entry_widgets", "pairs_text", "widget"]
