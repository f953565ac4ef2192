"""Runs tab: the history table, a loss overlay of selected runs, resume / rename / delete (with confirmation), and a
run's held-out evaluation: its metrics, the confusion table (classification), its worst answers, and Evaluate."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .. import actions, charts
from ..format import count, duration, esc, eval_text, folder_size, loss, size, task_score, user_error
from ..i18n import T, choice, t
from ..messages import localize
from .common import run_choices, safe_get

HEADERS = ("runs.col.name", "runs.col.model", "runs.col.method", "runs.col.trainable", "runs.col.status",
           "runs.col.duration", "runs.col.train_loss", "runs.col.eval_loss", "runs.col.task_score",
           "runs.col.metrics", "runs.col.adapter_size", "runs.col.id")
EXAMPLE_HEADERS = ("runs.ex.prompt", "runs.ex.reference", "runs.ex.answer", "runs.ex.score")
PROMPT_TAIL = 160  # characters of a prompt the worst-examples table shows (its end: the question)
EVAL_POLL_S = 1.0


def table(ctx) -> dict[str, list]:
    """The runs table (headers in the page's language, statuses translated)."""
    rows = []
    for r in ctx.store.list():
        rows.append([r.name, r.model, r.method, count(r.trainable), choice("status", r.status), duration(r.duration_s),
                     loss(r.final_loss), loss(r.final_eval_loss), task_score(r.eval_metrics), eval_text(r.eval_metrics),
                     size(folder_size(r.adapter_dir)), r.id])
    return {"headers": [t(h) for h in HEADERS], "data": rows}


def examples_table(rows: list[list[Any]] | None = None) -> dict[str, list]:
    return {"headers": [t(h) for h in EXAMPLE_HEADERS], "data": rows or []}


def evaluation_view(ctx, run_id: str | None) -> tuple[str, dict[str, list]]:
    """(markdown: the run's metrics and confusion table, the table of its worst held-out answers)."""
    if not run_id or safe_get(ctx, run_id) is None:
        return "", examples_table()
    v = actions.run_evaluation(ctx, run_id)
    m = v["metrics"]
    if not m:
        return t("runs.no_eval"), examples_table()
    lines = [t("runs.eval_summary", score=esc(task_score(m)), rows=m.get("eval_rows", "?"),
               loss=loss(m.get("eval_loss")), other=esc(eval_text(m)))]
    labels, confusion = v["labels"] or [], v["confusion"] or {}
    if confusion:
        cols = [*labels, *sorted({p for row in confusion.values() for p in row} - set(labels))]
        lines += ["", f"| {t('runs.confusion_corner')} | " + " | ".join(esc(c) for c in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for ref, row in confusion.items():
            lines.append(f"| {esc(ref)} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    rows = [[_tail(e.get("prompt", "")), e.get("reference", ""), e.get("answer", ""), e.get("score")]
            for e in v["examples"]]
    return "\n".join(lines), examples_table(rows)


def _tail(text: str) -> str:
    return text if len(text) <= PROMPT_TAIL else "…" + text[-PROMPT_TAIL:]


def create_runs_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    with gr.Tab(T("tab.runs"), id="runs") as tab:
        with gr.Row():
            gr.Markdown(T("runs.intro"))
            refresh = gr.Button(T("runs.refresh"), scale=0, min_width=110)
        runs_table = gr.Dataframe(value=table(ctx), interactive=False, wrap=True, max_height=320,
                                  elem_id="ps-runs-table")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                compare = gr.Dropdown(run_choices(ctx), multiselect=True, max_choices=8, label=T("runs.compare"),
                                      allow_custom_value=True, elem_id="ps-compare")
                compare_log = gr.Checkbox(False, label=T("runs.log_scale"))
                overlay = gr.Plot(None, show_label=False, elem_id="ps-overlay")
            with gr.Column(scale=2):
                target = gr.Dropdown(run_choices(ctx), label=T("runs.run"), elem_id="ps-run-target",
                                     allow_custom_value=True)
                with gr.Row():
                    new_name = gr.Textbox(label=T("runs.new_name"), max_length=80, scale=3)
                    rename = gr.Button(T("runs.rename"), scale=1)
                with gr.Row():
                    resume = gr.Button(T("runs.resume"), variant="primary")
                    evaluate = gr.Button(T("runs.evaluate"), elem_id="ps-evaluate")
                    delete = gr.Button(T("runs.delete"), variant="stop")
                with gr.Row(visible=False) as confirm_row:
                    confirm_md = gr.Markdown()
                    confirm = gr.Button(T("runs.confirm_delete"), variant="stop", elem_id="ps-confirm-delete")
                    cancel = gr.Button(T("runs.cancel"))
                message = gr.Markdown(elem_id="ps-runs-message")
        gr.Markdown(T("runs.eval_heading"))
        eval_md = gr.Markdown(elem_id="ps-eval-summary")
        worst = gr.Dataframe(value=examples_table(), interactive=False, wrap=True, max_height=360,
                             label=T("runs.worst"), elem_id="ps-eval-examples")

    def refreshed(sel_compare=None, sel_target=None):
        choices = run_choices(ctx)
        ids = {v for _, v in choices}
        return (table(ctx), gr.update(choices=choices, value=[v for v in (sel_compare or []) if v in ids]),
                gr.update(choices=choices, value=sel_target if sel_target in ids else None))

    def on_overlay(ids, log_y):
        runs = [safe_get(ctx, i) for i in (ids or [])]
        return charts.overlay_figure([(r.name, ctx.metrics.events(r.dir)) for r in runs if r], log_scale=bool(log_y))

    def on_rename(run_id, name, sel):
        new = actions.rename_run(ctx, run_id, name)
        return t("runs.renamed", name=esc(new)), *refreshed(sel, run_id)

    def on_resume(run_id, sel):
        r = actions.resume_run(ctx, run_id)
        where = t("runs.queue_position", position=r["position"]) if r["position"] else ""
        return t("runs.resuming", name=esc(r["name"]), where=where), *refreshed(sel, run_id)

    def on_delete(run_id):
        d = actions.delete_check(ctx, run_id)
        if not d["deletable"]:
            return gr.update(visible=False), "", esc(localize(d["reason"]))
        return gr.update(visible=True), t("runs.delete_question", name=esc(d["name"])), ""

    def on_evaluate(run_id, sel):
        r = actions.evaluate_run(ctx, run_id)
        yield (t("runs.evaluating", name=esc(r["name"])), *refreshed(sel, run_id),
               *evaluation_view(ctx, run_id))
        while (state := actions.evaluation(ctx, run_id, wait_s=EVAL_POLL_S))["status"] == "running":
            pass  # a generator handler runs in a worker thread: the page stays live meanwhile
        if state["status"] == "failed":
            raise ValueError(f"Evaluation of {r['name']} failed: {state['message']}")
        yield t("runs.evaluated", name=esc(r["name"])), *refreshed(sel, run_id), *evaluation_view(ctx, run_id)

    def on_confirm(run_id, sel):
        name = actions.delete_run(ctx, run_id)
        return gr.update(visible=False), t("runs.deleted", name=esc(name)), *refreshed(sel, None)

    lists = [runs_table, compare, target]
    refresh.click(refreshed, [compare, target], lists, api_name="runs_table")
    tab.select(refreshed, [compare, target], lists, api_visibility="private")
    compare.change(on_overlay, [compare, compare_log], overlay, api_name="overlay")
    compare_log.change(on_overlay, [compare, compare_log], overlay, api_visibility="private")
    target.change(lambda i: getattr(safe_get(ctx, i), "name", ""), target, new_name,
                  api_visibility="private")
    target.change(lambda run_id: evaluation_view(ctx, run_id), target, [eval_md, worst], api_name="run_evaluation")
    rename.click(user_error(on_rename), [target, new_name, compare], [message, *lists], api_name="rename_run")
    resume.click(user_error(on_resume), [target, compare], [message, *lists], api_name="resume_run")
    evaluate.click(user_error(on_evaluate), [target, compare], [message, *lists, eval_md, worst],
                   api_name="evaluate_run")
    delete.click(user_error(on_delete), target, [confirm_row, confirm_md, message], api_name="delete_run")
    confirm.click(user_error(on_confirm), [target, compare], [confirm_row, message, *lists], api_name="confirm_delete")
    cancel.click(lambda: (gr.update(visible=False), T("runs.nothing_deleted")), None, [confirm_row, message],
                 api_visibility="private")
    shared["on_load"].append((lambda: (table(ctx), examples_table(), charts.overlay_figure([])), None,
                              [runs_table, worst, overlay]))
    return {"table": runs_table, "compare": compare, "overlay": overlay, "target": target, "message": message,
            "confirm": confirm, "evaluate": evaluate, "eval_summary": eval_md, "eval_examples": worst}
