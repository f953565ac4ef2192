"""Train tab: model, method (every registry entry, each with only its own knobs), hyperparameters in number
widgets, trainable-parameter count and peak-memory estimate, the method advisor, and Start / Stop.

Every widget of the form has a name (studio.actions: "method", "train.lr", "lora.r", ...). Handlers receive the
form as a dict keyed by component (Gradio's set-of-components input), turn it into {name: value} and call
studio.actions; they answer with a dict keyed by component, so a handler only names what it changes.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from core.advisor import GOALS, HARDWARE
from core.config import TrainConfig

from .. import actions
from ..actions import (BY_KEY, DEFAULT_ENTRY, ENTRIES, PARAM_IDS, TRAIN_ADVANCED, TRAIN_MAIN, detect_hardware,
                       param_name)
from ..format import esc, user_error
from ..knobs import entry_widgets, widget


def create_train_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    columns: dict[str, gr.Column] = {}
    knobs: dict[str, gr.Component] = {}  # form id -> widget, e.g. "lora.r"
    train_widgets: dict[str, gr.Component] = {}  # form id -> widget, e.g. "train.lr"
    with gr.Tab("Train", id="train"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=380):
                with gr.Row():
                    name = gr.Textbox(label="Run name", placeholder="e.g. quill-lora (optional)", max_length=80, scale=2)
                    method = gr.Dropdown([(e.label, e.key) for e in ENTRIES], value=DEFAULT_ENTRY, label="Method",
                                         scale=3, elem_id="ps-method")
                blurb = gr.Markdown(BY_KEY[DEFAULT_ENTRY].blurb, elem_classes="ps-blurb")
                for entry in ENTRIES:
                    with gr.Column(visible=entry.key == DEFAULT_ENTRY, elem_classes="ps-knobs") as col:
                        with gr.Row(equal_height=False):
                            knobs.update(entry_widgets(entry, min_width=170))
                    columns[entry.key] = col
                gr.Markdown("#### Hyperparameters")
                with gr.Row():  # every value is TrainConfig's default: the same run as the CLI's
                    for n in TRAIN_MAIN[:4]:
                        train_widgets[f"train.{n}"] = widget(TrainConfig, n, elem_id=f"ps-train-{n}")
                with gr.Row():
                    for n in TRAIN_MAIN[4:]:
                        train_widgets[f"train.{n}"] = widget(TrainConfig, n, elem_id=f"ps-train-{n}")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        for n in TRAIN_ADVANCED:
                            train_widgets[f"train.{n}"] = widget(TrainConfig, n, elem_id=f"ps-train-{n}")
            with gr.Column(scale=2, min_width=300):
                estimate = gr.Markdown("Press **Check** to count the trainable parameters and estimate memory.",
                                       elem_id="ps-estimate")
                check = gr.Button("Check configuration", variant="secondary")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="ps-start")
                    stop = gr.Button("Stop", variant="stop", elem_id="ps-stop")
                status = gr.Markdown("", elem_id="ps-train-status")
                with gr.Accordion("Not sure which method? Ask the advisor", open=False, elem_id="ps-advisor"):
                    rows = gr.Number(1000, precision=0, minimum=0, label="Training examples (rows)",
                                     info="Filled in from the loaded dataset.")
                    hardware = gr.Radio([(v, k) for k, v in HARDWARE.items()], value=detect_hardware(), label="Hardware")
                    goal = gr.Radio([(v, k) for k, v in GOALS.items()], value="quick", label="Goal")
                    advise = gr.Button("Recommend")
                    advice_md = gr.Markdown(elem_id="ps-advice")
                    apply = gr.Button("Apply this recommendation", visible=False, elem_id="ps-apply-advice")
                    advice_state = gr.State(None)

    dataset, model = shared["dataset"], shared["model"]
    data_w = shared["data_tab"]
    form: dict[str, gr.Component] = {
        "name": name, "method": method, "model": model, "train.max_len": data_w["max_len"],
        "data.val_fraction": data_w["val_fraction"], "data.val_count": data_w["val_count"],
        "data.fields": data_w["fields"],
        **train_widgets, **knobs,
    }
    # Handlers take the form as keyword arguments named after the form ids (train.lr -> train_lr), so Gradio's API
    # (gradio_client's view_api) shows every parameter by name; ``dataset`` is the session's, never sent by clients.
    form_inputs = {"inputs_kwargs": {**{param_name(fid): comp for fid, comp in form.items()}, "dataset": dataset}}

    def values(kw: dict) -> dict[str, Any]:
        """{form id: value} from the handler's keyword arguments, with the session's dataset as data.path."""
        out = {PARAM_IDS[k]: v for k, v in kw.items() if k != "dataset"}
        ds = kw["dataset"]
        out["data.path"] = ds["path"] if ds else ""
        return out

    def on_check(**data) -> str:
        try:
            return actions.check(ctx, values(data), data["dataset"])["markdown"]
        except ValueError as e:
            return f"✗ {esc(e)}"

    def on_start(**data) -> dict:
        """Validate everything, then queue the run. Problems come back as one sentence; nothing is started."""
        if not data["dataset"]:
            return {status: "✗ Load a dataset in the **Data** tab first."}
        try:
            run = actions.start_run(ctx, values(data), data["dataset"])
        except ValueError as e:
            return {status: f"✗ {esc(e)}"}
        est = run["estimate"]
        where = f"waiting in the queue (position {run['position']})" if run["position"] else "starting"
        msg = (f"✓ **{esc(run['name'])}** is {where}. {est['trainable']:,} of {est['total']:,} parameters train "
               f"({est['percent']:.3g}%). Watch it in the **Monitor** tab.")
        return {status: msg, shared["monitor_run"]: run["id"], shared["tabs"]: gr.Tabs(selected="monitor"),
                estimate: est["markdown"]}

    def on_stop(current):
        return esc(actions.stop_run(ctx, current))

    def shown(key: str) -> dict:
        """Show one entry's knobs, its blurb and its suggested learning rate."""
        entry = BY_KEY[key]
        return {**{col: gr.update(visible=k == key) for k, col in columns.items()}, blurb: entry.blurb,
                train_widgets["train.lr"]: entry.lr}

    def on_advise(rows, hardware, goal):  # named like their widgets, for the API
        a = actions.advise(int(rows or 0), hardware, goal)
        text = f"**Recommended: {esc(a['label'])}**\n\n" + "\n".join(f"- {esc(r)}" for r in a["reasons"])
        if a["alternatives"]:
            text += "\n\nAlso worth a try: " + ", ".join(esc(x) for x in a["alternatives"])
        return text, gr.update(visible=True), a

    def on_apply(advice) -> dict:
        """Put the advice into the form: the entry, its knobs and the train values it sets."""
        if not advice:
            return {}
        vals = actions.apply_advice(advice)
        out = {**shown(vals["method"]), method: vals["method"]}
        out.update({form[fid]: v for fid, v in vals.items() if fid != "method"})
        return out

    dataset.change(lambda d: d["valid_rows"] if d else gr.skip(), dataset, rows, api_visibility="private")
    check.click(user_error(on_check), None, estimate, api_name="check_config", **form_inputs)
    start.click(user_error(on_start), None, [status, shared["monitor_run"], shared["tabs"], estimate],
                api_name="start_run", **form_inputs)
    stop.click(user_error(on_stop), [shared["monitor_run"]], status, api_name="stop_run")
    entry_outputs = [*columns.values(), blurb, train_widgets["train.lr"]]
    method.input(shown, method, entry_outputs, api_visibility="private").then(
        on_check, None, estimate, api_visibility="private", **form_inputs)
    advise.click(user_error(on_advise), [rows, hardware, goal], [advice_md, apply, advice_state], api_name="advise")
    apply_outputs = [method, *columns.values(), blurb, *train_widgets.values(), *knobs.values()]
    apply.click(user_error(on_apply), advice_state, apply_outputs, api_name="apply_advice").then(
        on_check, None, estimate, api_visibility="private", **form_inputs)
    return {"name": name, "method": method, "estimate": estimate, "start": start, "stop": stop, "status": status,
            "rows": rows, "check": check, "apply": apply, "form": form, **train_widgets}
