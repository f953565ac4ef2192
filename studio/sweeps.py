"""Experiments, without Gradio: queue several methods (or one method's knob values) on one dataset through the job
queue with the same split, seed and steps (core.sweep plans them), and read back the leaderboard as the runs end.
The Experiment tab and the HTTP API call these; inputs and outputs are plain data, a bad input raises ValueError
with one sentence.

    start_experiment(ctx, {"data.path": p, "methods": ["lora", "bitfit"], "steps": 20})   # -> {"id", "runs", ...}
    start_experiment(ctx, {"data.path": p, "methods": ["lora"], "knob": "r=4,8,16", "steps": 20})
    experiment_view(ctx, sweep_id)     # leaderboard rows, best values, the advisor's verdict, loss curves
    experiment_files(ctx, sweep_id)    # DATA/exports/sweeps/<id>/results.csv and report.html
    top_runs(ctx, sweep_id, 2)         # the best finished runs with an adapter, for Chat
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from core.leaderboard import best_values, ranked
from core.methods import specs
from core.preflight import preflight
from core.sweep import Results, knob_choices, parse_knob, parse_methods, plan_sweep, results, shared_settings
from core.sweep import sweep_record, write_outputs
from core.sweep_report import HEADERS, MARK

from .actions import _dataset_path, build_config, detect_hardware
from .datasets import EXTENSIONS, shown_name
from .paths import inside

GOAL = "quality"  # the advisor's goal an experiment is compared with: which method gives the best results
DEFAULT_STEPS = 30


def method_choices() -> list[tuple[str, str]]:
    """(label, method name) of every registered method."""
    return [(s.label, name) for name, s in specs().items()]


def knobs_of(method: str) -> list[str]:
    """The knobs of ``method`` an experiment can vary (numbers and choices)."""
    return list(knob_choices(method)) if method in specs() else []


def _steps(value: Any) -> int:
    try:
        steps = int(value)
    except (TypeError, ValueError):
        raise ValueError("Steps: enter the number of optimiser steps every run takes.") from None
    if steps < 1 or steps != float(value):
        raise ValueError("Steps: enter a whole number of optimiser steps, at least 1.")
    return steps


def start_experiment(ctx, form: dict[str, Any]) -> dict[str, Any]:
    """Queue every run of an experiment. ``form``: data.path, methods (list or "a,b"), knob ("r=4,8,16", only with
    one method), steps, and optionally name, model, seed, batch_size, max_len. Nothing is queued when it raises.
    Returns {"id", "name", "runs": [{"id", "name", "label"}]}."""
    methods = parse_methods(form.get("methods") or [])
    knob_text = str(form.get("knob") or "").strip()
    if knob_text and len(methods) != 1:
        raise ValueError(f"A knob experiment varies one method; {len(methods)} are chosen ({', '.join(methods)}).")
    knob = parse_knob(knob_text, methods[0]) if knob_text else None
    steps = _steps(form.get("steps", DEFAULT_STEPS))
    train = {f"train.{k}": form[k] for k in ("seed", "batch_size", "max_len") if form.get(k) not in (None, "")}
    base = build_config({"method": methods[0], "model": form.get("model") or "",
                         "data.path": _dataset_path(ctx, str(form.get("data.path") or "")),
                         "train.max_steps": steps, **train},
                        default_model=ctx.default_model, max_bytes=ctx.max_upload_bytes)
    plan = plan_sweep(base, methods, knob)
    for r in plan:
        preflight(r.config)  # every run checked before any is queued
    name = str(form.get("name") or "").strip() or f"exp-{time.strftime('%m%d-%H%M%S')}"
    queued = [ctx.jobs.submit(r.config, name=f"{name}-{r.name}") for r in plan]
    sweep_id = ctx.store.create_sweep(name, sweep_record(plan, knob, GOAL), [r.id for r in queued])
    return {"id": sweep_id, "name": name,
            "runs": [{"id": q.id, "name": q.name, "label": r.name} for q, r in zip(queued, plan)]}


def _experiment(ctx, sweep_id: Any) -> dict[str, Any]:
    if not sweep_id or not isinstance(sweep_id, str):
        raise ValueError("Start or choose an experiment first.")
    sweep = ctx.store.sweep(sweep_id)
    if sweep is None:
        raise ValueError(f"No experiment with id {sweep_id}.")
    return sweep


def _results(ctx, sweep: dict[str, Any]) -> tuple[Results, list[str]]:
    runs = sweep["runs"]
    knob = (sweep["record"].get("knob") or "").partition("=")[0] or None
    labels = [r.name.removeprefix(f"{sweep['name']}-") for r in runs]
    return results([r.dir for r in runs], labels, knob, sweep["record"].get("goal") or GOAL, detect_hardware()), \
        [r.id for r in runs]


def experiment_view(ctx, sweep_id: str) -> dict[str, Any]:
    """The experiment as it stands: {"id", "name", "record", "rows" (core.leaderboard rows plus "id", in queue
    order), "best" ({column: best value}), "verdict", "curves" ([(label, events)]), "done" (every run ended)}."""
    sweep = _experiment(ctx, sweep_id)
    res, ids = _results(ctx, sweep)
    rows = [{**row, "id": run_id} for row, run_id in zip(res.rows, ids)]
    return {"id": sweep["id"], "name": sweep["name"], "record": sweep["record"], "rows": rows,
            "best": best_values(res.rows), "verdict": res.verdict, "curves": res.curves,
            "done": all(not r.active for r in sweep["runs"])}


def experiments(ctx) -> list[tuple[str, str]]:
    """(name, id) of every experiment, newest first."""
    return [(s["name"], s["id"]) for s in ctx.store.sweeps()]


def experiment_files(ctx, sweep_id: str) -> dict[str, str]:
    """Write the experiment's results.csv and report.html (as they stand) under DATA/exports/sweeps/<id>/."""
    sweep = _experiment(ctx, sweep_id)
    res, _ = _results(ctx, sweep)
    folder = inside(ctx.exports_dir, "sweeps", sweep["id"])
    csv_path, html_path = write_outputs(folder, res, shared_settings(sweep["record"]))
    return {"csv": str(csv_path), "html": str(html_path)}


def top_runs(ctx, sweep_id: str, n: int = 2) -> list[str]:
    """Ids of the ``n`` best finished runs of the experiment that have an adapter (best task score first)."""
    view = experiment_view(ctx, sweep_id)
    ready = {r.id for r in _experiment(ctx, sweep_id)["runs"] if not r.active and r.has_adapter}
    best = [r["id"] for r in ranked(view["rows"]) if r["id"] in ready]
    if len(best) < min(n, 2):
        raise ValueError(f"Chat needs {min(n, 2)} finished runs of this experiment; {len(best)} "
                         f"{'is' if len(best) == 1 else 'are'} ready.")
    return best[:n]


def dataset_choices(ctx) -> list[tuple[str, str]]:
    """(label, path) of the datasets an experiment may use: the bundled samples and the uploads, newest first.
    Uploads of one name with different contents are told apart by their upload time and content hash."""
    out = [(f"sample · {name}", str(p)) for name, p in ctx.samples().items()]
    uploads = sorted((p for p in Path(ctx.uploads_dir).glob("*") if p.is_file() and p.suffix in EXTENSIONS),
                     key=lambda p: -p.stat().st_mtime)
    names = Counter(shown_name(p) for p in uploads)

    def label(p: Path) -> str:
        name = shown_name(p)
        if names[name] == 1:
            return f"upload · {name}"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.stat().st_mtime))
        return f"upload · {name} ({when}, {p.name[:6]})"  # store_upload names a file <content hash>-<name>

    return out + [(label(p), str(p)) for p in uploads]


# The leaderboard as the Experiment tab shows it: (header, core.leaderboard column); headers are the report's.
TABLE = tuple((HEADERS[c], c) for c in ("run", "method", "knobs", "status", "task_metric", "task_score", "eval_loss",
                                        "trainable", "trainable_pct", "train_s", "tokens_per_s", "peak_mem_mb",
                                        "adapter_mb", "can_merge"))
BEST_MARK = MARK


def _shown(col: str, v: Any) -> Any:
    return ("yes" if v else "no") if col == "can_merge" and v is not None else v


def leaderboard_table(view: dict[str, Any]) -> dict[str, Any]:
    """{"headers", "rows" (numbers kept as numbers, so the table sorts them), "best" ({header: the best value
    of that column})} of an experiment_view."""
    rows = [[_shown(col, r.get(col)) for _, col in TABLE] for r in view["rows"]]
    best = {h: _shown(col, view["best"][col]) for h, col in TABLE if col in view["best"]}
    return {"headers": [h for h, _ in TABLE], "rows": rows, "best": best}
