"""Plotly figures drawn from metrics.jsonl events (schema: core.events). Pure functions: events in,
figure out, so they are tested without a browser and redrawn by the Monitor tab's timer. Titles and axes are
in the language of the request that draws them (studio.i18n.t)."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from core.blocks import block_index, depth_label, label_order
from core.events import finite as _num
from core.events import of_type

from .i18n import t

HEIGHT = 320
COLORS = ["#4f46e5", "#0891b2", "#16a34a", "#d97706", "#db2777", "#7c3aed", "#475569", "#dc2626"]


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(
        title={"text": title, "font": {"size": 14}},
        template="plotly_white",
        height=height,
        margin={"l": 55, "r": 15, "t": 45, "b": 45},
        xaxis_title=x,
        yaxis_title=y,
        legend={"orientation": "h", "y": -0.25},
        uirevision="keep",  # keep the user's zoom across timer redraws
    )
    return fig


def empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 13})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, "", "")


def ema(values: list[float], alpha: float = 0.9) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing): s_t = α·s_{t−1} + (1−α)·x_t, / (1−α^t)."""
    out, s = [], 0.0
    for t, v in enumerate(values, 1):
        s = alpha * s + (1 - alpha) * v
        out.append(s / (1 - alpha**t))
    return out


def _loss_points(events: list[dict]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for e in of_type(events, "step"):
        loss = _num(e.get("loss"))
        if loss is not None:
            xs.append(e.get("step"))
            ys.append(loss)
    return xs, ys


def loss_figure(events: list[dict], log_scale: bool = False, smoothing: float = 0.9) -> go.Figure:
    """Train loss (raw, thin) and its EMA (bold), plus eval loss as markers."""
    xs, ys = _loss_points(events)
    evals = [(e.get("step"), _num(e.get("eval_loss"))) for e in of_type(events, "eval")]
    evals = [(s, v) for s, v in evals if v is not None]
    if not xs and not evals:
        return empty(t("chart.loss"), t("chart.no_steps"))
    fig = go.Figure()
    if xs:
        fig.add_scatter(x=xs, y=ys, mode="lines", name=t("chart.train_raw"), line={"color": "#a5b4fc", "width": 1})
        fig.add_scatter(x=xs, y=ema(ys, smoothing), mode="lines", name=t("chart.train_ema", smoothing=f"{smoothing:g}"),
                        line={"color": COLORS[0], "width": 2.5})
    if evals:
        fig.add_scatter(x=[s for s, _ in evals], y=[v for _, v in evals], mode="lines+markers", name=t("chart.eval"),
                        line={"color": COLORS[3], "width": 2, "dash": "dot"}, marker={"size": 8})
    _layout(fig, t("chart.loss"), t("chart.step"), t("chart.cross_entropy"))
    if log_scale:
        fig.update_yaxes(type="log")
    return fig


def lr_groups_figure(events: list[dict]) -> go.Figure:
    """The learning rate of every optimiser param group over steps (LLRD makes them fan out)."""
    steps = of_type(events, "step")
    if not steps:
        return empty(t("chart.lr_groups"), t("chart.no_steps"))
    names: list[str] = []
    for e in steps:
        for n in (e.get("lr") or {}):
            if n not in names:
                names.append(n)
    fig = go.Figure()
    same = all(len({round(v, 15) for v in (e.get("lr") or {}).values() if _num(v) is not None}) <= 1 for e in steps)
    if same and len(names) > 1:  # one line instead of a legend of identical curves
        names, label = names[:1], t("chart.all_groups", n=len(names))
    else:
        label = ""
    for i, n in enumerate(names):
        pts = [(e["step"], _num((e.get("lr") or {}).get(n))) for e in steps]
        pts = [(s, v) for s, v in pts if v is not None]
        fig.add_scatter(x=[s for s, _ in pts], y=[v for _, v in pts], mode="lines", name=label or shown_depth(n),
                        showlegend=True, line={"color": COLORS[i % len(COLORS)], "width": 2})
    title = t("chart.lr_groups")
    if _single_rate(steps[-1]):
        title += t("chart.lr_groups_single")
    return _layout(fig, title, t("chart.step"), t("chart.lr"))


def shown_depth(label: str) -> str:
    """A depth label of the events ("embed", "block 3", "head", "prompt") in the page's language; any other
    group name (a method's own) as it is."""
    if (block := block_index(label)) is not None:
        return t("chart.depth_block", n=block)
    named = {"embed": "chart.depth_embed", "head": "chart.depth_head", "prompt": "chart.depth_prompt"}
    return t(named[label]) if label in named else label


def _single_rate(step_event: dict) -> bool:
    rates = {round(v, 15) for v in (step_event.get("lr") or {}).values() if _num(v) is not None}
    return len(rates) <= 1


def lr_depth_figure(events: list[dict]) -> go.Figure:
    """The current learning rate by block depth, bottom (embeddings) to top (head)."""
    steps = of_type(events, "step")
    if not steps:
        return empty(t("chart.lr_depth"), t("chart.no_steps"))
    start = (of_type(events, "start") or [{}])[-1]
    num_layers = start.get("num_layers")
    by_depth = steps[-1].get("lr_by_depth") or {}
    items = []
    for k, v in by_depth.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            key = 10**9  # method-owned (None) last
        if _num(v) is not None:
            items.append((key, shown_depth(depth_label(k, num_layers)), float(v)))
    if not items:
        return empty(t("chart.lr_depth"), t("chart.no_layers"))
    items.sort()
    fig = go.Figure(go.Bar(x=[n for _, n, _ in items], y=[v for _, _, v in items], marker_color=COLORS[1]))
    title = t("chart.lr_depth_at", step=steps[-1].get("step"))
    if len({round(v, 15) for _, _, v in items}) == 1:
        title += t("chart.lr_depth_flat")
    return _layout(fig, title, t("chart.depth"), t("chart.lr"))


def grad_heatmap(events: list[dict], max_columns: int = 300) -> go.Figure:
    """Gradient norm per block (rows, bottom block at the bottom) over steps (columns), colour on a log scale."""
    steps = [e for e in of_type(events, "step") if e.get("grad_norm")]
    if not steps:
        return empty(t("chart.grad"), t("chart.no_grad"))
    if len(steps) > max_columns:  # thin out long runs so the browser stays fast
        stride = math.ceil(len(steps) / max_columns)
        steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    labels = sorted({k for e in steps for k in e["grad_norm"] if k != "total"}, key=label_order)
    z = []
    for label in labels:
        row = []
        for e in steps:
            v = _num(e["grad_norm"].get(label))
            row.append(math.log10(v) if v is not None and v > 0 else None)
        z.append(row)
    fig = go.Figure(go.Heatmap(
        x=[e["step"] for e in steps], y=[shown_depth(n) for n in labels], z=z, colorscale="Viridis",
        colorbar={"title": {"text": "log10 ‖g‖"}},
        hovertemplate=t("chart.step") + " %{x}<br>%{y}<br>log10 ‖g‖ = %{z:.2f}<extra></extra>",
    ))
    return _layout(fig, t("chart.grad"), t("chart.step"), "", height=max(HEIGHT, 18 * len(labels) + 120))


def length_histogram(lengths: list[int], max_len: int | None = None) -> go.Figure:
    """Token lengths of the examples, with the truncation limit as a line."""
    if not lengths:
        return empty(t("chart.lengths"), t("chart.no_examples"))
    fig = go.Figure(go.Histogram(x=lengths, nbinsx=min(50, max(5, len(set(lengths)))), marker_color=COLORS[0]))
    title = t("chart.lengths_n", n=len(lengths))
    if max_len and max_len <= 1.25 * max(lengths):  # draw the limit only where it does not squash the bars
        fig.add_vline(x=max_len, line={"color": COLORS[7], "dash": "dash"},
                      annotation_text=f"max_len {max_len}", annotation_position="top left")
    elif max_len:
        title += t("chart.lengths_below", max_len=max_len)
    return _layout(fig, title, t("chart.tokens_per_example"), t("chart.examples"))


def overlay_figure(runs: list[tuple[str, list[dict]]], log_scale: bool = False, smoothing: float = 0.9) -> go.Figure:
    """Smoothed train loss (solid) and eval loss (dotted) of several runs on one chart."""
    if not runs:
        return empty(t("chart.overlay"), t("chart.overlay_empty"))
    fig = go.Figure()
    for i, (label, events) in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        xs, ys = _loss_points(events)
        if xs:
            fig.add_scatter(x=xs, y=ema(ys, smoothing), mode="lines", name=label, line={"color": color, "width": 2})
        evals = [(e.get("step"), _num(e.get("eval_loss"))) for e in of_type(events, "eval")]
        evals = [(s, v) for s, v in evals if v is not None]
        if evals:
            fig.add_scatter(x=[s for s, _ in evals], y=[v for _, v in evals], mode="lines+markers",
                            name=t("chart.run_eval", label=label), line={"color": color, "dash": "dot"})
    _layout(fig, t("chart.overlay_title"), t("chart.step"), t("chart.loss_axis"), height=380)
    if log_scale:
        fig.update_yaxes(type="log")
    return fig
