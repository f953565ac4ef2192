"""A sweep's self-contained HTML report: the leaderboard table (best value per column marked), the advisor's line,
and the runs' loss curves overlaid in one plotly chart. plotly.js is inlined, so the file opens offline and
needs no server; nothing is fetched from the network.

    write_report(path, rows, curves, verdict, settings)
"""

from __future__ import annotations

import html
import os
import threading
from pathlib import Path
from typing import Any

from .events import finite, of_type
from .leaderboard import COLUMNS, best_values

HEADERS = {"run": "run", "method": "method", "knobs": "knob", "status": "status", "task_metric": "task metric",
           "task_score": "task score", "eval_loss": "eval loss", "trainable": "trainable params",
           "trainable_pct": "trainable %", "steps": "steps", "lr": "lr", "train_s": "train s", "eval_s": "eval s",
           "supervised_tokens": "supervised tokens", "tokens_per_s": "supervised tok/s", "peak_mem_mb": "peak MiB",
           "adapter_mb": "adapter MiB", "can_merge": "can merge"}
MARK = "★"  # beside the best value of a column


def cell(value: Any) -> str:
    """A leaderboard value as text: integers with thousands separators, floats to 4 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def loss_figure(curves: list[tuple[str, list[dict]]]):
    """Train loss (lines) and eval loss (dotted, markers) of every run against the optimiser step."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, events in curves:
        steps = [(e["step"], finite(e.get("loss"))) for e in of_type(events, "step")]
        steps = [(s, v) for s, v in steps if v is not None]
        line = fig.add_scatter(x=[s for s, _ in steps], y=[v for _, v in steps], mode="lines", name=label)
        evals = [(e["step"], finite(e.get("eval_loss"))) for e in of_type(events, "eval")]
        evals = [(s, v) for s, v in evals if v is not None]
        if evals:
            color = line.data[-1].line.color
            fig.add_scatter(x=[s for s, _ in evals], y=[v for _, v in evals], mode="lines+markers",
                            name=f"{label} (eval)", line={"dash": "dot", "color": color})
    fig.update_layout(title="Loss per optimiser step (train solid, eval dotted)", template="plotly_white",
                      xaxis_title="step", yaxis_title="loss", height=460, legend={"orientation": "h", "y": -0.2})
    return fig


def _table(rows: list[dict[str, Any]]) -> str:
    best = best_values(rows)
    head = "".join(f"<th>{html.escape(HEADERS[c])}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        tds = []
        for c in COLUMNS:
            v = r.get(c)
            is_best = c in best and v is not None and v == best[c]
            text = html.escape(cell(v)) + (f" {MARK}" if is_best else "")
            tds.append(f'<td class="best">{text}</td>' if is_best else f"<td>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#1f2937}table{border-collapse:collapse;
font-size:13px}th,td{border:1px solid #d1d5db;padding:4px 8px;text-align:right}th{background:#f3f4f6}
td:first-child,td:nth-child(2),td:nth-child(3),td:nth-child(4),td:nth-child(5){text-align:left}
td.best{font-weight:700;background:#ecfdf5}.advice{margin:12px 0;padding:8px 12px;background:#eef2ff}"""


def render(rows: list[dict[str, Any]], curves: list[tuple[str, list[dict]]], verdict: dict[str, Any],
           settings: dict[str, Any]) -> str:
    """The report as one HTML document (plotly.js inlined)."""
    import plotly.io as pio

    chart = pio.to_html(loss_figure(curves), include_plotlyjs=True, full_html=False)
    shared = ", ".join(f"{k} {html.escape(str(v))}" for k, v in settings.items() if v not in (None, ""))
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>PEFT Studio sweep</title>"
        f"<style>{STYLE}</style></head><body><h1>Sweep leaderboard</h1>"
        f"<p>Same for every run: {shared}. {MARK} marks the best value of a column.</p>"
        f"<p class=\"advice\">{html.escape(verdict['text'])}</p>{_table(rows)}<h2>Loss curves</h2>{chart}"
        "</body></html>"
    )


def write_report(path: str | Path, rows: list[dict[str, Any]], curves: list[tuple[str, list[dict]]],
                 verdict: dict[str, Any], settings: dict[str, Any]) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # one per writer
    tmp.write_text(render(rows, curves, verdict, settings), encoding="utf-8")
    tmp.replace(path)
    return path
