"""Monitor tab: the live view of one run, redrawn by a gr.Timer about once a second from its metrics.jsonl.

Progress (step/total, elapsed, ETA, tokens/s), loss (raw + EMA + eval, log-scale toggle), LLRD curves (lr of
every group over steps, current lr by depth), the per-block gradient-norm heatmap, the log tail and the status.
Charts are only redrawn when new events arrived, so an idle tick costs one stat() of the metrics file.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from .. import actions, charts
from ..format import duration, esc, loss
from ..i18n import T, choice, t
from ..messages import localize
from ..metrics import log_tail, summarize
from .common import default_run, run_choices, safe_get

STATUS_COLORS = {"queued": "#64748b", "running": "#4f46e5", "completed": "#16a34a", "stopped": "#d97706",
                 "failed": "#dc2626", "interrupted": "#dc2626"}


def progress_html(run, s: dict, position: int | None) -> str:
    if run is None:
        return f"<div class='ps-progress ps-muted'>{T('monitor.no_run')}</div>"
    step, total = s.get("steps") or 0, s.get("total_steps") or run.total_steps or 0
    pct = 100.0 * step / total if total else 0.0
    color = STATUS_COLORS.get(run.status, "#64748b")
    badge = f"<span class='ps-badge' style='background:{color}'>{esc(choice('status', run.status))}</span>"
    if run.status == "queued":
        detail = t("monitor.queued_at", position=position) if position else t("monitor.waiting")
    else:
        parts = [t("monitor.step", step=step, total=total or "?"), f"{pct:.0f}%",
                 t("monitor.elapsed", time=duration(s.get("elapsed_s") if run.active else run.duration_s))]
        if run.status == "running" and total and step >= total:  # every step taken: the end-of-run work is left
            parts.append(t("monitor.finishing"))
        elif run.status == "running":
            parts.append(t("monitor.eta", time=duration(s.get("eta_s"))))
        if s.get("tokens_per_s"):
            parts.append(t("monitor.tokens_per_s", n=f"{s['tokens_per_s']:.0f}"))
        detail = " · ".join(parts)
    bar = f"<div class='ps-bar'><div class='ps-bar-fill' style='width:{pct:.1f}%;background:{color}'></div></div>"
    reason = ""
    if run.reason and not run.active:
        cls = "ps-reason-bad" if run.status in ("failed", "interrupted") else "ps-reason"
        reason = f"<div class='{cls}'>{esc(localize(run.reason))}</div>"
    return (f"<div class='ps-progress' data-status='{esc(run.status)}' data-step='{step}'>"
            f"<div class='ps-progress-head'>{badge} <b>{esc(run.name)}</b> <span class='ps-muted'>{esc(run.method)} · "
            f"{esc(run.model)}</span></div>{bar}<div class='ps-progress-detail'>{detail}</div>{reason}</div>")


def stats_md(run, s: dict) -> str:
    if run is None:
        return ""
    items = [t("monitor.train_loss", loss=loss(s.get("final_loss"))),
             t("monitor.eval_loss", loss=loss(s.get("final_eval_loss")))]
    if s.get("trainable"):
        items.append(t("monitor.trainable", trainable=f"{s['trainable']:,}", total=f"{s.get('total_params') or 0:,}",
                       percent=f"{100 * s['trainable'] / max(1, s.get('total_params') or 1):.3g}"))
    if s.get("epoch") is not None:
        items.append(t("monitor.epoch", epoch=f"{s['epoch']:.2f}"))
    return " · ".join(items)


def empty_charts() -> tuple:
    """The four charts before any run, titled in the page's language."""
    return tuple(charts.empty(t(k), t("chart.no_run")) for k in ("chart.loss", "chart.grad", "chart.lr_groups",
                                                                  "chart.lr_depth"))


def create_monitor_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    with gr.Tab(T("tab.monitor"), id="monitor") as tab:
        with gr.Row(equal_height=True):
            run_dd = gr.Dropdown(run_choices(ctx), label=T("monitor.run"), elem_id="ps-monitor-run",
                                 allow_custom_value=True, scale=3)
            log_scale = gr.Checkbox(False, label=T("monitor.log_scale"), scale=0, min_width=140)
            stop = gr.Button(T("monitor.stop"), variant="stop", size="sm", scale=0, min_width=140)
        progress = gr.HTML(progress_html(None, {}, None), elem_id="ps-progress")
        stats = gr.Markdown(elem_id="ps-stats")
        with gr.Row():
            loss_plot = gr.Plot(None, elem_id="ps-loss", show_label=False)
            heat = gr.Plot(None, elem_id="ps-heat", show_label=False)
        with gr.Row():
            lr_plot = gr.Plot(None, elem_id="ps-lr", show_label=False)
            depth_plot = gr.Plot(None, elem_id="ps-depth", show_label=False)
        log_box = gr.Textbox(label=T("monitor.log"), lines=12, max_lines=12, interactive=False, autoscroll=True,
                             elem_id="ps-log")
        seen = gr.State(None)
        fresh = gr.State(None)  # an empty "seen": forces a full redraw
        timer = gr.Timer(1.0)

    def tick(run_id: str | None, log_y: bool, last: Any):
        """One refresh. Plots are skipped unless the run, the scale or the number of events changed."""
        run = safe_get(ctx, run_id)
        if run is None:
            if last == "empty":
                return progress_html(None, {}, None), "", *[gr.skip()] * 4, "", last
            return progress_html(None, {}, None), "", *empty_charts(), "", "empty"
        events = ctx.metrics.events(run.dir)
        s = summarize(events)
        pos = ctx.jobs.position(run.id) if run.status == "queued" else None
        key = [run.id, len(events), bool(log_y), run.status]
        tail = log_tail(run.dir, 12)
        if key == last:
            return progress_html(run, s, pos), stats_md(run, s), *[gr.skip()] * 4, tail, last
        return (progress_html(run, s, pos), stats_md(run, s), charts.loss_figure(events, log_scale=bool(log_y)),
                charts.grad_heatmap(events), charts.lr_groups_figure(events), charts.lr_depth_figure(events), tail, key)

    outputs = [progress, stats, loss_plot, heat, lr_plot, depth_plot, log_box, seen]
    timer.tick(tick, [run_dd, log_scale, seen], outputs, show_progress="hidden", api_visibility="private")
    run_dd.change(tick, [run_dd, log_scale, fresh], outputs, show_progress="hidden", api_name="monitor")
    log_scale.change(tick, [run_dd, log_scale, seen], outputs, show_progress="hidden", api_visibility="private")
    stop.click(lambda rid: esc(localize(actions.stop_run(ctx, rid))) if rid else "", run_dd, stats,
               api_visibility="private")
    shared["on_load"].append((empty_charts, None, [loss_plot, heat, lr_plot, depth_plot]))
    shared["monitor_run"].change(lambda rid: gr.update(choices=run_choices(ctx), value=rid) if rid else gr.skip(),
                                 shared["monitor_run"], run_dd, api_visibility="private")
    tab.select(lambda cur: gr.update(choices=run_choices(ctx), value=cur or default_run(ctx)), run_dd, run_dd,
               api_visibility="private")

    def run_status(run_id: str) -> dict:
        """Machine-readable state of a run (for scripts and tests)."""
        return actions.run_status(ctx, run_id)

    shared["apis"].append((run_status, "run_status"))  # registered by ui.py, outside the Tabs
    return {"run": run_dd, "progress": progress, "loss": loss_plot, "heat": heat, "lr": lr_plot, "depth": depth_plot,
            "log": log_box, "timer": timer}
