"""Experiment tab: choose a dataset, then several methods or one method's knob values; one click queues them all
(same split, seed and steps). The leaderboard fills as runs end (best value per column marked), the loss curves
overlay below it, the advisor's recommendation is checked against the measurement, results.csv and report.html
download, and one click opens the two best runs side by side in Chat. The logic is in studio.sweeps."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from core.sweep_report import cell

from .. import charts, sweeps
from ..format import esc, run_label, user_error
from ..i18n import T, choice, method_key, t
from .common import finished_with_adapter

POLL_S = 2.0
MODES = ("methods", "knob")  # several methods, or one method's knob values


def method_choices() -> list[tuple]:
    return [(T(method_key(name, "label")), name) for _, name in sweeps.method_choices()]


def cell_text(v: Any, best: bool) -> str:
    """A leaderboard cell as the report writes it (core.sweep_report.cell), starred when it is its column's best."""
    text = "—" if isinstance(v, float) and pd.isna(v) else cell(v)
    return f"{text} {sweeps.BEST_MARK}" if best else text


def styled(view: dict[str, Any] | None):
    """The leaderboard as a pandas Styler: numbers stay numbers (the table sorts them); the best cell of each
    column shows a star and a highlight."""
    names = {h: choice("board", col) for h, col in sweeps.TABLE}  # headers in the page's language
    if view is None:
        return pd.DataFrame(columns=list(names.values()))
    table = sweeps.leaderboard_table(view)
    df = pd.DataFrame(table["rows"], columns=[names[h] for h in table["headers"]])
    best = {names[h]: v for h, v in table["best"].items()}
    styler = df.style
    for col in df.columns:
        styler = styler.format(lambda v, c=col: cell_text(v, c in best and v == best[c]), subset=[col])
    mark = "font-weight: 700; background-color: #dcfce7"
    return styler.apply(lambda s: [mark if s.name in best and v == best[s.name] else "" for v in s], axis=0)


def verdict_text(view: dict[str, Any]) -> str:
    """The advisor's pick against the measurement (core.leaderboard.verdict), in the page's language."""
    v = view["verdict"]
    label = t(method_key(v["recommended"], "label"))
    if v["agreed"] is None:
        return t("experiment.v.none", label=label)
    best = next((r for r in view["rows"] if r.get("run") == v["best_run"]), {})
    by = f"{best.get('task_metric', '')} {best.get('task_score') or 0:.4f}"
    if v["agreed"]:
        return t("experiment.v.agree", label=label, run=v["best_run"], by=by)
    if v["recommended"] not in {r.get("method") for r in view["rows"]}:
        return t("experiment.v.absent", label=label, run=v["best_run"], by=by)
    return t("experiment.v.disagree", label=label, run=v["best_run"], by=by)


def create_experiment_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    with gr.Tab(T("tab.experiment"), id="experiment") as tab:
        gr.Markdown(T("experiment.intro"))
        with gr.Row(equal_height=True):
            dataset = gr.Dropdown(sweeps.dataset_choices(ctx), label=T("experiment.dataset"), elem_id="ps-exp-data",
                                  scale=3)
            mode = gr.Radio([(T("experiment.mode.methods"), MODES[0]), (T("experiment.mode.knob"), MODES[1])],
                            value=MODES[0], label=T("experiment.compare"), elem_id="ps-exp-mode", scale=2)
        methods = gr.CheckboxGroup(method_choices(), value=["lora", "bitfit"], label=T("experiment.methods"),
                                   elem_id="ps-exp-methods")
        with gr.Row(visible=False) as knob_row:
            method = gr.Dropdown(method_choices(), value="lora", label=T("experiment.method"),
                                 elem_id="ps-exp-method")
            knob = gr.Dropdown(sweeps.knobs_of("lora"), value="r", label=T("experiment.knob"), elem_id="ps-exp-knob")
            values = gr.Textbox("4,8,16", label=T("experiment.values"), elem_id="ps-exp-values")
        with gr.Row(equal_height=True):
            steps = gr.Number(sweeps.DEFAULT_STEPS, precision=0, minimum=1, label=T("experiment.steps"),
                              elem_id="ps-exp-steps")
            seed = gr.Number(42, precision=0, minimum=0, label=T("field.seed"), elem_id="ps-exp-seed")
            name = gr.Textbox(label=T("experiment.name"), placeholder=T("experiment.name_placeholder"), max_lines=1,
                              elem_id="ps-exp-name")
            start = gr.Button(T("experiment.start"), variant="primary", elem_id="ps-exp-start")
        message = gr.Markdown(elem_id="ps-exp-message")
        with gr.Row(equal_height=True):
            current = gr.Dropdown(sweeps.experiments(ctx), label=T("experiment.current"), elem_id="ps-exp-current",
                                  allow_custom_value=True, scale=3)
            csv_btn = gr.DownloadButton("results.csv", elem_id="ps-exp-csv", scale=0, min_width=140, interactive=False)
            html_btn = gr.DownloadButton("report.html", elem_id="ps-exp-html", scale=0, min_width=140,
                                         interactive=False)
            to_chat = gr.Button(T("experiment.to_chat"), elem_id="ps-exp-chat", scale=0, min_width=200)
        advice = gr.Markdown(elem_id="ps-exp-advice")
        # full width, the overlay below: fourteen columns beside a chart broke the headers inside words
        board = gr.Dataframe(styled(None), interactive=False, wrap=True, elem_id="ps-exp-board",
                             label=T("experiment.board"))
        curves = gr.Plot(charts.overlay_figure([]), show_label=False, elem_id="ps-exp-curves")
        seen = gr.State(None)
        timer = gr.Timer(POLL_S)

    def on_mode(m):
        knobs = m == MODES[1]
        return gr.update(visible=not knobs), gr.update(visible=knobs)

    def on_method(m):
        ks = sweeps.knobs_of(m)
        return gr.update(choices=ks, value=ks[0] if ks else None)

    def on_start(data, mode, methods, method, knob, values, steps, seed, name, model):  # named for the API
        form = {"data.path": data or "", "steps": steps, "seed": seed, "name": name, "model": model}
        if mode == MODES[1]:
            form.update(methods=[method] if method else [], knob=f"{knob}={values}" if knob else "")
        else:
            form["methods"] = methods or []
        started = sweeps.start_experiment(ctx, form)
        text = t("experiment.queued", name=esc(started["name"]), n=len(started["runs"]),
                 runs=esc(", ".join(r["label"] for r in started["runs"])))
        return text, gr.update(choices=sweeps.experiments(ctx), value=started["id"]), None

    def refresh(sweep_id, last):
        """Redraw when the experiment changed (a step, an eval, an end); skip otherwise. results.csv and
        report.html are rewritten only when a run's status or score changed (not at every step)."""
        if not sweep_id or ctx.store.sweep(sweep_id) is None:
            return "", gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
        view = sweeps.experiment_view(ctx, sweep_id)
        ended = [sweep_id, [(r["status"], r["task_score"]) for r in view["rows"]], view["done"]]
        key = [*ended, [r["steps"] for r in view["rows"]]]
        if key == last:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
        csv_up = html_up = gr.skip()
        if not last or last[:3] != ended:
            files = sweeps.experiment_files(ctx, sweep_id)
            csv_up = gr.update(value=files["csv"], interactive=True)
            html_up = gr.update(value=files["html"], interactive=True)
        state = t("experiment.all_ended") if view["done"] else t("experiment.still_running")
        text = t("experiment.verdict", state=state, verdict=esc(verdict_text(view)))
        return text, styled(view), charts.overlay_figure(view["curves"]), csv_up, html_up, key

    def on_tab(selected):
        """Fresh lists when the tab opens: uploads and experiments made since the page was built."""
        choices = sweeps.experiments(ctx)
        keep = selected if selected in {i for _, i in choices} else (choices[0][1] if choices else None)
        return gr.update(choices=sweeps.dataset_choices(ctx)), gr.update(choices=choices, value=keep)

    mode.change(on_mode, mode, [methods, knob_row], api_visibility="private")
    method.change(on_method, method, knob, api_visibility="private")
    start.click(user_error(on_start), [dataset, mode, methods, method, knob, values, steps, seed, name,
                                       shared["model"]], [message, current, seen], api_name="start_experiment")
    outputs = [advice, board, curves, csv_btn, html_btn, seen]
    current.change(user_error(refresh), [current, seen], outputs, api_visibility="private")
    timer.tick(user_error(refresh), [current, seen], outputs, api_visibility="private")
    tab.select(on_tab, current, [dataset, current], api_visibility="private")
    shared["on_load"].append((lambda: styled(None), None, [board]))
    return {"dataset": dataset, "mode": mode, "methods": methods, "start": start, "current": current,
            "board": board, "curves": curves, "advice": advice, "to_chat": to_chat, "message": message}


def wire_chat(ctx, shared: dict[str, Any]) -> None:
    """The "Open the top two in Chat" button: it needs the Chat tab's run picker, built after this tab."""
    tab, chat = shared["experiment_tab"], shared["chat_tab"]

    def open_in_chat(sweep_id):
        ids = sweeps.top_runs(ctx, sweep_id, 2)
        choices = [(run_label(r), r.id) for r in finished_with_adapter(ctx)]
        return gr.Tabs(selected="chat"), gr.update(choices=choices, value=ids)

    tab["to_chat"].click(user_error(open_in_chat), tab["current"], [shared["tabs"], chat["runs"]],
                         api_name="experiment_to_chat")
