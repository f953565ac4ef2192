"""Train tab: model, method (twelve entries, each with only its own knobs), hyperparameters in number widgets,
trainable-parameter count and peak-memory estimate, the method advisor, and Start / Stop."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from core.advisor import GOALS, HARDWARE, recommend
from core.config import TrainConfig
from core.preflight import preflight

from ..format import esc, user_error
from ..knobs import BY_KEY, ENTRIES, TRAIN_ADVANCED, TRAIN_MAIN, build_config, entry_for, entry_widgets, widget

DEFAULT_ENTRY = "lora"
TRAIN_DEFAULTS = {"epochs": 3.0, "batch_size": 8, "eval_every": 10, "lr": 2e-4}


def detect_hardware() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            mem = torch.cuda.get_device_properties(0).total_memory
            return "large_gpu" if torch.cuda.device_count() > 1 or mem > 24 * 2**30 else "small_gpu"
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


def create_train_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    columns: dict[str, gr.Column] = {}
    knob_keys: list[tuple[str, str]] = []
    knob_widgets: list[gr.Component] = []
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
                            for fname, w in entry_widgets(entry, min_width=170):
                                knob_keys.append((entry.key, fname))
                                knob_widgets.append(w)
                    columns[entry.key] = col
                gr.Markdown("#### Hyperparameters")
                train_widgets: dict[str, gr.Component] = {}
                with gr.Row():
                    for n in TRAIN_MAIN[:4]:
                        train_widgets[n] = widget(TrainConfig, n, TRAIN_DEFAULTS.get(n, _default(n)))
                with gr.Row():
                    for n in TRAIN_MAIN[4:]:
                        train_widgets[n] = widget(TrainConfig, n, TRAIN_DEFAULTS.get(n, _default(n)))
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        for n in TRAIN_ADVANCED:
                            train_widgets[n] = widget(TrainConfig, n, TRAIN_DEFAULTS.get(n, _default(n)))
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
                    advice_md = gr.Markdown()
                    apply = gr.Button("Apply this recommendation", visible=False)
                    advice_state = gr.State(None)

    dataset, model = shared["dataset"], shared["model"]
    data_w = shared["data_tab"]
    train_names = list(train_widgets)
    form_inputs = [method, model, dataset, data_w["max_len"], data_w["val_fraction"], data_w["val_count"],
                   *train_widgets.values(), *knob_widgets]

    def config_from(args: tuple):
        entry, model_name, ds, max_len, vf, vc = args[:6]
        tvals = dict(zip(train_names, args[6 : 6 + len(train_names)]))
        kvals = dict(zip(knob_keys, args[6 + len(train_names) :]))
        tvals["max_len"] = max_len
        data = {"path": ds["path"] if ds else "", "val_fraction": vf, "val_count": vc,
                "max_bytes": ctx.max_upload_bytes}
        cfg = build_config(entry, kvals, tvals, (model_name or "").strip() or ctx.default_model, data)
        seq = min(int(ds["stats"]["max"]), cfg.train.max_len) if ds and ds.get("stats") else None
        return cfg, ctx.estimator.estimate(cfg.model, cfg.method, cfg.train, seq, _device(cfg.train.device))

    def on_check(*args):
        try:
            return config_from(args)[1].markdown()
        except ValueError as e:
            return f"✗ {esc(e)}"

    def on_start(run_name, *args):
        """Validate everything, then queue the run. Problems come back as one sentence; nothing is started."""
        ds = args[2]
        if not ds:
            return "✗ Load a dataset in the **Data** tab first.", gr.skip(), gr.skip(), gr.skip()
        try:
            cfg, est = config_from(args)
            preflight(cfg)  # the engine's own check of the config against the model, before anything is queued
            run = ctx.jobs.submit(cfg, name=(run_name or "").strip() or f"{args[0]}-{time.strftime('%m%d-%H%M%S')}")
        except ValueError as e:
            return f"✗ {esc(e)}", gr.skip(), gr.skip(), gr.skip()
        pos = ctx.jobs.position(run.id)
        where = f"waiting in the queue (position {pos})" if pos and ctx.jobs.running() else "starting"
        msg = (f"✓ **{esc(run.name)}** is {where}. {est.trainable:,} of {est.total:,} parameters train "
               f"({est.percent:.3g}%). Watch it in the **Monitor** tab.")
        return msg, run.id, gr.Tabs(selected="monitor"), est.markdown()

    def on_stop(current):
        run_id = current or next((r.id for r in ctx.store.list(status=("running", "queued"))), None)
        if not run_id:
            return "Nothing is running."
        return esc(ctx.jobs.stop(run_id))

    def on_method(key):
        entry = BY_KEY[key]
        return [gr.update(visible=k == key) for k in columns] + [entry.blurb, entry.lr]

    def on_advise(n, hw, gl):
        a = recommend(int(n or 0), hw, gl)
        text = f"**Recommended: {a.label}**\n\n" + "\n".join(f"- {esc(r)}" for r in a.reasons)
        if a.alternatives:
            text += "\n\nAlso worth a try: " + ", ".join(a.alternatives)
        return text, gr.update(visible=True), {"method": a.method, "method_config": a.method_config, "train": a.train}

    def on_apply(advice):
        if not advice:
            return [gr.skip()] * (len(columns) + 3 + len(knob_widgets))
        key = entry_for(advice["method"], advice["method_config"], advice["train"])
        entry = BY_KEY[key]
        knob_updates = []
        for k, fname in knob_keys:
            if k != key:
                knob_updates.append(gr.skip())
            elif fname.startswith("train."):
                knob_updates.append(advice["train"].get(fname[6:], gr.skip()))
            else:
                knob_updates.append(advice["method_config"].get(fname, gr.skip()))
        lr = advice["train"].get("lr", entry.lr)
        return [key, *[gr.update(visible=k == key) for k in columns], entry.blurb, lr, *knob_updates]

    dataset.change(lambda d: d["valid_rows"] if d else gr.skip(), dataset, rows, api_visibility="private")
    check.click(user_error(on_check), form_inputs, estimate, api_name="check_config")
    start.click(user_error(on_start), [name, *form_inputs], [status, shared["monitor_run"], shared["tabs"], estimate],
                api_name="start_run")
    stop.click(user_error(on_stop), [shared["monitor_run"]], status, api_name="stop_run")
    method.input(on_method, method, [*columns.values(), blurb, train_widgets["lr"]], api_visibility="private").then(
        on_check, form_inputs, estimate, api_visibility="private")
    advise.click(user_error(on_advise), [rows, hardware, goal], [advice_md, apply, advice_state], api_name="advise")
    apply.click(on_apply, advice_state, [method, *columns.values(), blurb, train_widgets["lr"], *knob_widgets],
                api_name="apply_advice").then(on_check, form_inputs, estimate, api_visibility="private")
    return {"name": name, "method": method, "estimate": estimate, "start": start, "stop": stop, "status": status,
            "rows": rows, "check": check, **{f"train.{k}": w for k, w in train_widgets.items()}}


def _default(name: str) -> Any:
    return getattr(TrainConfig(), name)


def _device(pref: str) -> str:
    if pref in ("cuda", "cpu", "mps"):
        return pref
    return "cuda" if detect_hardware() != "cpu" else "cpu"
