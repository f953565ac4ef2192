"""Train tab: model, method (every registry entry, each with only its own knobs), hyperparameters in number
widgets, trainable-parameter count and peak-memory estimate, the method advisor, and Start / Stop.

Every widget of the form has a name (studio.actions: "method", "train.lr", "lora.r", ...). Handlers receive the
form as a dict keyed by component (Gradio's set-of-components input), turn it into {name: value} and call
studio.actions; they answer with a dict keyed by component, so a handler only names what it changes.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr

from core.advisor import GOALS, HARDWARE
from core.config import TrainConfig

from .. import actions, first_run
from ..actions import (DEFAULT_ENTRY, ENTRIES, PARAM_IDS, TRAIN_ADVANCED, TRAIN_MAIN, detect_hardware, entry_for,
                       param_name)
from ..format import esc, user_error
from ..i18n import T, goal_key, hardware_key, lang, method_key, t
from ..knobs import entry_widgets, widget
from ..messages import localize


def same_kind(value: Any, default: Any) -> bool:
    """Whether ``value`` can go into a field whose fresh value is ``default``: a number for a number (not a bool),
    a bool for a bool, text for text, text or a list of text for a list or mapping (studio.knobs shows them as a
    text box or a multiselect); anything for a field without a default."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(default, (list, dict)):
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(x, str) for x in value))
    return isinstance(value, type(default))


def create_train_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    columns: dict[str, gr.Column] = {}
    knobs: dict[str, gr.Component] = {}  # form id -> widget, e.g. "lora.r"
    train_widgets: dict[str, gr.Component] = {}  # form id -> widget, e.g. "train.lr"
    with gr.Tab(T("tab.train"), id="train") as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=380):
                with gr.Row():
                    name = gr.Textbox(label=T("train.name"), placeholder=T("train.name_placeholder"), max_length=80,
                                      scale=2)
                    method = gr.Dropdown([(T(method_key(e.key, "label")), e.key) for e in ENTRIES],
                                         value=DEFAULT_ENTRY, label=T("train.method"), scale=3, elem_id="ps-method")
                blurb = gr.Markdown(T(method_key(DEFAULT_ENTRY, "blurb")), elem_classes="ps-blurb")
                for entry in ENTRIES:
                    with gr.Column(visible=entry.key == DEFAULT_ENTRY, elem_classes="ps-knobs") as col:
                        with gr.Row(equal_height=False):
                            knobs.update(entry_widgets(entry, min_width=170))
                    columns[entry.key] = col
                gr.Markdown(T("train.hyperparameters"))
                with gr.Row():  # every value is TrainConfig's default: the same run as the CLI's
                    for n in TRAIN_MAIN[:4]:
                        train_widgets[f"train.{n}"] = widget(TrainConfig, n, elem_id=f"ps-train-{n}")
                with gr.Row():
                    for n in TRAIN_MAIN[4:]:
                        train_widgets[f"train.{n}"] = widget(TrainConfig, n, elem_id=f"ps-train-{n}")
                with gr.Accordion(T("train.advanced"), open=False):
                    with gr.Row():
                        for n in TRAIN_ADVANCED:
                            train_widgets[f"train.{n}"] = widget(TrainConfig, n, elem_id=f"ps-train-{n}")
            with gr.Column(scale=2, min_width=300):
                estimate = gr.Markdown(T("train.estimate_hint"), elem_id="ps-estimate")
                check = gr.Button(T("train.check"), variant="secondary")
                with gr.Row():
                    start = gr.Button(T("train.start"), variant="primary", elem_id="ps-start")
                    stop = gr.Button(T("train.stop"), variant="stop", elem_id="ps-stop")
                status = gr.Markdown("", elem_id="ps-train-status")
                with gr.Accordion(T("train.advisor"), open=False, elem_id="ps-advisor"):
                    rows = gr.Number(1000, precision=0, minimum=0, label=T("train.rows"), info=T("train.rows_info"))
                    hardware = gr.Radio([(T(hardware_key(k)), k) for k in HARDWARE], value=detect_hardware(),
                                        label=T("train.hardware"))
                    goal = gr.Radio([(T(goal_key(k)), k) for k in GOALS], value="quick", label=T("train.goal"))
                    advise = gr.Button(T("train.recommend"))
                    advice_md = gr.Markdown(elem_id="ps-advice")
                    apply = gr.Button(T("train.apply_advice"), visible=False, elem_id="ps-apply-advice")
                    advice_state = gr.State(None)
        # Inside the tab: a component made directly under gr.Tabs shifts the tab labels after it.
        suggested = gr.State(None)  # the last first-run suggestion put into the form (studio.first_run)

    dataset, model, kept = shared["dataset"], shared["model"], shared["kept_form"]
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
            return f"✗ {esc(localize(e))}"

    def on_start(**data) -> dict:
        """Validate everything, then queue the run. Problems come back as one sentence; nothing is started."""
        if not data["dataset"]:
            return {status: "✗ " + t("train.need_dataset")}
        try:
            run = actions.start_run(ctx, values(data), data["dataset"])
        except ValueError as e:
            return {status: f"✗ {esc(localize(e))}"}
        est = run["estimate"]
        where = t("train.queued_at", position=run["position"]) if run["position"] else t("train.starting")
        msg = t("train.started", name=esc(run["name"]), where=where, trainable=f"{est['trainable']:,}",
                total=f"{est['total']:,}", percent=f"{est['percent']:.3g}")
        return {status: msg, shared["monitor_run"]: run["id"], shared["tabs"]: gr.Tabs(selected="monitor"),
                estimate: est["markdown"]}

    def clear_refusal(current: str):
        """After Check or a new method, a refused Start's ✗ no longer describes the form: the estimate says now."""
        return "" if (current or "").startswith("✗") else gr.skip()

    def on_stop(current):
        return esc(localize(actions.stop_run(ctx, current)))

    def shown(key: str) -> dict:
        """Show one entry's knobs, its blurb and its suggested learning rate."""
        entry = actions.BY_KEY[key]
        return {**{col: gr.update(visible=k == key) for k, col in columns.items()},
                blurb: t(method_key(key, "blurb")), train_widgets["train.lr"]: entry.lr}

    def on_advise(rows, hardware, goal):  # named like their widgets, for the API
        a = actions.advise(int(rows or 0), hardware, goal)
        label = t(method_key(entry_for(a["method"], a["method_config"], a["train"]), "label"))
        reasons = a["reasons_zh"] if lang() == "zh" else a["reasons"]
        text = t("train.recommended", label=esc(label)) + "\n\n" + "\n".join(f"- {esc(r)}" for r in reasons)
        if a["alternative_methods"]:
            also = ", ".join(esc(t(method_key(m, "label"))) for m in a["alternative_methods"])
            text += "\n\n" + t("train.also_try", methods=also)
        return text, gr.update(visible=True), a

    def on_apply(advice) -> dict:
        """Put the advice into the form: the entry, its knobs and the train values it sets."""
        if not advice:
            return {method: gr.skip()}  # an empty dict would count as one value for all the outputs
        vals = actions.apply_advice(advice)
        out = {**shown(vals["method"]), method: vals["method"]}
        out.update({form[fid]: v for fid, v in vals.items() if fid != "method"})
        return out

    def on_open(first_run_state, **data) -> dict:
        """The tab opens: on a CPU, size the first run to the loaded dataset (only the fields the user has not
        changed; once per dataset), so the values and their estimate are in view when they change."""
        ds = data["dataset"]
        last = first_run_state or {}
        unchanged = {suggested: gr.skip()}  # Gradio needs a value for its outputs: an empty dict counts as one
        if not ds or last.get("path") == ds["path"] or not first_run.untouched(values(data), last.get("values")):
            return unchanged
        try:
            tip = first_run.suggest(ctx, values(data), ds, detect_hardware())
        except ValueError:  # a form that does not check: leave it to Check and Start to say why
            return unchanged
        if tip is None:
            return unchanged
        out: dict = {form[k]: v for k, v in tip["values"].items() if k != "method"}
        out.update({suggested: {"path": ds["path"], "values": tip["values"]}, estimate: first_run.markdown(tip)})
        return out

    dataset.change(lambda d: d["valid_rows"] if d else gr.skip(), dataset, rows, api_visibility="private")
    tab.select(on_open, None, [suggested, estimate, *(form[k] for k in first_run.SUGGESTED if k != "method")],
               api_visibility="private", inputs_kwargs={**form_inputs["inputs_kwargs"], "first_run_state": suggested})
    check.click(user_error(on_check), None, estimate, api_name="check_config", **form_inputs).then(
        clear_refusal, status, status, api_visibility="private")
    start.click(user_error(on_start), None, [status, shared["monitor_run"], shared["tabs"], estimate],
                api_name="start_run", **form_inputs)
    stop.click(user_error(on_stop), [shared["monitor_run"]], status, api_name="stop_run")
    entry_outputs = [*columns.values(), blurb, train_widgets["train.lr"]]
    method.input(shown, method, entry_outputs, api_visibility="private").then(
        on_check, None, estimate, api_visibility="private", **form_inputs).then(
        clear_refusal, status, status, api_visibility="private")
    advise.click(user_error(on_advise), [rows, hardware, goal], [advice_md, apply, advice_state], api_name="advise")
    apply_outputs = [method, *columns.values(), blurb, *train_widgets.values(), *knobs.values()]
    apply.click(user_error(on_apply), advice_state, apply_outputs, api_name="apply_advice").then(
        on_check, None, estimate, api_visibility="private", **form_inputs)
    # The language switch reloads the page: the form goes with it, in the browser, and the new page puts it back.
    # The data tab keeps its own fields (max_len, the column mapping) with the dataset.
    not_kept = ("data.path", "model", "train.max_len", "data.fields")

    def keep(first_run_state, **data) -> dict:
        return {"values": {k: v for k, v in values(data).items() if k not in not_kept}, "suggested": first_run_state}

    def put_back(saved) -> dict:
        """Once: a later reload starts afresh ({} clears it; the browser does not store an empty value). A value
        that no longer fits its field (kept by another version of the studio) keeps the field's default."""
        if not saved:
            return {kept: gr.skip()}
        vals = saved.get("values") if isinstance(saved, dict) else None
        if not isinstance(vals, dict) or vals.get("method") not in actions.BY_KEY:
            return {kept: {}}
        defaults = actions.form_defaults()
        fits = {k: v for k, v in vals.items() if k in form and k not in not_kept and same_kind(v, defaults.get(k))}
        return {**shown(vals["method"]), **{form[k]: v for k, v in fits.items()}, suggested: saved.get("suggested"),
                kept: {}}

    shared["on_switch"].append((keep, kept, {"inputs_kwargs": {**form_inputs["inputs_kwargs"],
                                                                "first_run_state": suggested}}))
    put_back_outputs = dict.fromkeys([kept, suggested, *entry_outputs, *(c for k, c in form.items() if k not in not_kept)])
    shared["on_load"].append((put_back, [kept], list(put_back_outputs)))
    return {"name": name, "method": method, "estimate": estimate, "start": start, "stop": stop, "status": status,
            "rows": rows, "check": check, "apply": apply, "form": form, **train_widgets}
