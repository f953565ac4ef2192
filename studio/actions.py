"""What the studio does, without Gradio: every tab handler is a thin wrapper around one function here, and the
HTTP API calls the same functions. Inputs and outputs are plain data (str, numbers, lists, dicts), never
components or updates; a problem with the user's input raises ValueError with one sentence naming the field.

The Train form is a flat dict of named values, one per widget, with LlamaBoard-style ids:

    name, method, model                  run name, menu entry key (core.methods.menu), base model
    data.path                            a dataset under DATA/uploads/ or a bundled sample
    data.fields                          the column mapping, a dict or "instruction=prompt, output=completion"
    data.val_fraction, data.val_count    DataConfig fields
    train.<field>                        TrainConfig fields (train.lr, train.epochs, train.max_len, ...)
    <entry>.<field>                      a knob of one menu entry: lora.r, llrd.freeze_embeddings, ...
    <entry>.train.<field>                a TrainConfig knob an entry shows itself: llrd.train.llrd_decay

A missing value takes core's default (TrainConfig, DataConfig, the method's config, the preset's values), so a
form of {"method": "lora", "data.path": p} is the same run as ``python -m core train`` with that method and
data. Knobs of entries other than the chosen one are ignored (the page sends every widget).

    form -> build_config -> RunConfig -> check (estimate) / start_run (preflight, then the job queue)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from core.advisor import recommend
from core.config import DataConfig, FieldError, RunConfig, TrainConfig
from core.data import TOKENISED, DataError
from core.evaluate import read_examples
from core.generate import GenerationSettings
from core.methods import menu, spec
from core.preflight import preflight

from .chat import MAX_PROMPT_CHARS, Column
from .datasets import inspect, shown_name, store_upload
from .export import adapter_zip, can_merge, gguf_file, gguf_snippet, loading_snippet, merged_model
from .metrics import of_type, summarize
from .i18n import t
from .messages import localize
from .paths import inside

# ---- the method menu ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One item of the Train tab's method menu: a registered method, or one of its presets."""

    key: str
    label: str
    method: str  # core method name
    fields: tuple[str, ...]  # method-config fields shown
    defaults: dict[str, Any] = field(default_factory=dict)  # overrides of the config defaults
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields this entry sets (shown as knobs)
    lr: float = 2e-4  # suggested learning rate (the page puts it in train.lr when the entry is chosen)
    blurb: str = ""

    def knobs(self) -> list[str]:
        """The entry's knob names: method-config fields, then "train.<field>" for the TrainConfig ones."""
        return [*self.fields, *(f"train.{n}" for n in self.train)]


def _entries() -> list[Entry]:
    out = []
    for key, (s, p) in menu().items():
        if p is None:
            out.append(Entry(key, s.label, s.name, s.knobs, lr=s.lr, blurb=s.blurb))
        else:
            out.append(Entry(key, p.label, s.name, p.fields, dict(p.method), dict(p.train), p.lr, p.blurb))
    return out


ENTRIES: list[Entry] = _entries()
BY_KEY = {e.key: e for e in ENTRIES}
DEFAULT_ENTRY = "lora"
TRAIN_MAIN = ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "scheduler", "warmup_steps", "eval_every")
TRAIN_ADVANCED = ("weight_decay", "max_grad_norm", "save_every", "log_every", "seed", "device", "precision", "grad_checkpointing",
                  "parallel", "eval_max_rows", "eval_max_new_tokens")
TRAIN_FORM = (*TRAIN_MAIN, *TRAIN_ADVANCED, "max_len")  # the Data tab shows max_len
DATA_FORM = ("path", "fields", "val_fraction", "val_count")


def knob_id(entry_key: str, name: str) -> str:
    """The form id of an entry's knob: knob_id("lora", "r") == "lora.r"."""
    return f"{entry_key}.{name}"


def _default(cls: type, name: str) -> Any:
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def form_defaults() -> dict[str, Any]:
    """Every form id with its value on a fresh page: core's dataclass defaults (one owner), the presets' values."""
    out: dict[str, Any] = {"name": "", "method": DEFAULT_ENTRY, "model": ""}
    out.update({f"data.{n}": _default(DataConfig, n) for n in DATA_FORM})
    out.update({f"train.{n}": _default(TrainConfig, n) for n in TRAIN_FORM})
    for e in ENTRIES:
        cls = spec(e.method).config_cls
        for n in e.fields:
            out[knob_id(e.key, n)] = e.defaults.get(n, _default(cls, n))
        for n, v in e.train.items():
            out[knob_id(e.key, f"train.{n}")] = v
    return out


FORM_IDS = tuple(form_defaults())


def param_name(form_id: str) -> str:
    """The Python name of a form id, as Gradio's API shows it: "train.lr" -> "train_lr", "lora.r" -> "lora_r"."""
    return form_id.replace(".", "_")


PARAM_IDS = {param_name(f): f for f in FORM_IDS}  # Gradio parameter name -> form id
assert len(PARAM_IDS) == len(FORM_IDS), "two form ids share a Gradio parameter name"


def _title(name: str) -> str:
    text = name.replace("_", " ")
    return text[0].upper() + text[1:]


def _coerce(value: Any, hint: Any) -> Any:
    if getattr(hint, "__origin__", None) is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return list(value or [])
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def build_config(form: dict[str, Any], *, default_model: str = "default", max_bytes: int | None = None) -> RunConfig:
    """The typed RunConfig of a form (see the module docstring). ValueError names the field when a value is
    missing, unknown or invalid."""
    unknown = sorted(set(form) - set(FORM_IDS))
    if unknown:
        raise ValueError(f"unknown form field(s) {', '.join(unknown)}; known: name, method, model, data.*, train.*, "
                         "<method>.<knob>")
    key = form.get("method") or DEFAULT_ENTRY
    entry = BY_KEY.get(key)
    if entry is None:
        raise ValueError(f"Method: choose one of {', '.join(e.key for e in ENTRIES)}")
    values: dict[str, Any] = dict(entry.defaults)
    train: dict[str, Any] = dict(entry.train)
    data: dict[str, Any] = {}
    for fid, value in form.items():
        section, _, name = fid.partition(".")
        if section == "train":
            train[name] = value
        elif section == "data":
            data[name] = value
        elif section == entry.key:
            if name.startswith("train."):
                train[name[6:]] = value
            else:
                values[name] = value
    for name, value in [*values.items(), *train.items(), *data.items()]:
        if value is None:
            raise ValueError(f"{_title(name)}: enter a value")
    hints, thints = get_type_hints(spec(entry.method).config_cls), get_type_hints(TrainConfig)
    values = {k: _coerce(v, hints[k]) if k in hints else v for k, v in values.items()}
    train = {k: _coerce(v, thints[k]) if k in thints else v for k, v in train.items()}
    if max_bytes is not None:
        data["max_bytes"] = max_bytes
    model = str(form.get("model") or "").strip() or default_model
    return RunConfig.from_dict({"model": model, "method": entry.method, "method_config": values, "train": train,
                                "data": data})


def entry_for(method: str, method_cfg: dict[str, Any], train: dict[str, Any]) -> str:
    """The menu entry of a (core method, knobs) pair, e.g. full + llrd_decay 0.9 -> 'llrd'."""
    preset = spec(method).preset_for(method_cfg, train)
    return preset.key if preset is not None else method


# ---- Train tab ---------------------------------------------------------------------------------------------


def _dataset_path(ctx, path: str) -> str:
    """A dataset the studio may read: an upload under DATA/uploads/ or a bundled sample. Never any other file."""
    if not path:
        raise ValueError("Load a dataset in the Data tab first.")
    p = Path(path).resolve()
    samples = {s.resolve() for s in ctx.samples().values()}
    if p in samples or (p.parent == Path(ctx.uploads_dir).resolve() and p.is_file()):
        return str(p)
    raise ValueError("data.path: only an uploaded dataset or a bundled sample can be used")


def config_of(ctx, form: dict[str, Any]) -> RunConfig:
    """build_config with the studio's default model and upload limit."""
    return build_config(form, default_model=ctx.default_model, max_bytes=ctx.max_upload_bytes)


def _device(pref: str, hardware: str) -> str:
    if pref in ("cuda", "cpu", "mps"):
        return pref
    return "cuda" if hardware != "cpu" else "cpu"


def _gpus() -> int:
    """GPUs a run on "cuda" spans: the studio's queue gives a run all of them (studio.jobs)."""
    from core.models import gpu_count

    return max(1, gpu_count())


def detect_hardware() -> str:
    """The advisor's hardware class of this machine: cpu, small_gpu or large_gpu (core.models owns the check)."""
    from core.models import hardware_class

    return hardware_class()


def _estimate(ctx, cfg: RunConfig, dataset: dict | None) -> dict[str, Any]:
    stats = dataset.get("stats") if dataset else None
    seq = min(int(stats["max"]), cfg.train.max_len) if stats else None
    device = _device(cfg.train.device, detect_hardware())
    est = ctx.estimator.estimate(cfg.model, cfg.method, cfg.train, seq, device, data=(stats, cfg.data) if stats else None,
                                 world=_gpus() if device == "cuda" else 1)
    return {"trainable": est.trainable, "total": est.total, "percent": est.percent, "peak_bytes": est.peak_bytes,
            "steps": est.steps, "train_seconds": est.train_seconds, "note": t(est.note) if est.note else "",
            "markdown": est.markdown()}


def check(ctx, form: dict[str, Any], dataset: dict | None = None) -> dict[str, Any]:
    """Trainable / total parameters and the peak-memory estimate of the form's run (no dataset needed; with the
    inspected dataset its real longest example bounds the sequence length, and the training time is estimated
    from its size and mean length)."""
    return _estimate(ctx, config_of(ctx, form), dataset)


def _queue(ctx, cfg: RunConfig, name: str, est: dict[str, Any]) -> dict[str, Any]:
    preflight(cfg)  # the engine's own check of the config against the model, before anything is queued
    name = name.strip() or f"{name_hint(cfg)}-{time.strftime('%m%d-%H%M%S')}"
    run = ctx.jobs.submit(cfg, name=name)
    pos = ctx.jobs.position(run.id)
    busy = [i for i in ctx.jobs.running() if i != run.id]  # it may have started between the two reads
    return {"id": run.id, "name": run.name, "position": pos if pos and busy else None, "estimate": est}


def name_hint(cfg: RunConfig) -> str:
    """The menu entry of a config (llrd, lora, ...): the start of a run's default name."""
    return entry_for(cfg.method_name, cfg.method.to_dict(), cfg.train.to_dict())


def start_run(ctx, form: dict[str, Any], dataset: dict | None = None) -> dict[str, Any]:
    """Validate everything (config, dataset, the engine's preflight on the model), then queue the run.
    Returns {"id", "name", "position", "estimate"}; nothing is queued when it raises. ``dataset`` (the inspected
    one, optional) only sharpens the memory estimate, as in ``check``."""
    form = dict(form)
    form["data.path"] = _dataset_path(ctx, str(form.get("data.path") or ""))
    cfg = config_of(ctx, form)
    return _queue(ctx, cfg, str(form.get("name") or ""), _estimate(ctx, cfg, dataset))


def submit_config(ctx, data: dict[str, Any]) -> dict[str, Any]:
    """Queue a run from a RunConfig in its dict shape (config.yaml's: name, model, method, method_config, train,
    data), as the HTTP API receives it. ``data.path`` is a bundled sample's file name (identity_sample.json) or
    an uploaded dataset; a missing model is the studio's default. Answers like start_run; a bad value raises
    core.config.FieldError, whose ``field`` is its path (train.lr)."""
    if not isinstance(data, dict):
        raise FieldError(f"the run config must be a JSON object, not {type(data).__name__}", "")
    data = {**data, "model": data.get("model") or ctx.default_model}
    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    path = str(section.get("path") or "")
    sample = ctx.samples().get(path)
    try:
        path = _dataset_path(ctx, str(sample or path))
    except ValueError as e:
        raise FieldError(str(e) if path else f"data.path: name a bundled sample ({', '.join(ctx.samples())}) "
                         "or an uploaded dataset", "data.path") from None
    data["data"] = {**section, "path": path, "max_bytes": ctx.max_upload_bytes}
    cfg = RunConfig.from_dict(data)
    return _queue(ctx, cfg, cfg.name, _estimate(ctx, cfg, None))


def stop_run(ctx, run_id: str | None = None) -> str:
    """Ask a run (or the running / first queued one) to stop; the answer is a sentence."""
    run_id = run_id or next((r.id for r in ctx.store.list(status=("running", "queued"))), None)
    if not run_id:
        return "Nothing is running."
    return ctx.jobs.stop(run_id)


def advise(rows: int, hardware: str, goal: str) -> dict[str, Any]:
    """The advisor's recommendation as plain data: method, knobs, train values, label, reasons, alternatives and
    ``form``, the form values that Apply puts in the Train tab."""
    a = recommend(int(rows), hardware, goal)  # type: ignore[arg-type]
    out = {"method": a.method, "method_config": dict(a.method_config), "train": dict(a.train), "label": a.label,
           "reasons": list(a.reasons), "alternatives": list(a.alternatives), "reasons_zh": list(a.reasons_zh),
           "alternative_methods": list(a.alternative_methods)}
    out["form"] = apply_advice(out)
    return out


def apply_advice(advice: dict[str, Any]) -> dict[str, Any]:
    """The form values of an advice: the menu entry, its knobs and the train values the advice sets.
    A knob the entry does not show stays as it is (it is not in the result)."""
    key = entry_for(advice["method"], advice.get("method_config") or {}, advice.get("train") or {})
    entry = BY_KEY[key]
    out: dict[str, Any] = {"method": key}
    for n, v in (advice.get("method_config") or {}).items():
        if n in entry.fields:
            out[knob_id(key, n)] = v
    for n, v in (advice.get("train") or {}).items():
        out[knob_id(key, f"train.{n}") if n in entry.train else f"train.{n}"] = v
    out.setdefault("train.lr", entry.lr)
    return out


# ---- Data tab ----------------------------------------------------------------------------------------------


def column_mapping(value: Any) -> dict[str, str]:
    """DataConfig.fields from the form: a dict, or the text "instruction=prompt, output=completion" (core parses
    and checks it); DataError with one sentence when it is not a valid mapping."""
    try:
        return DataConfig.from_dict({"fields": value or {}}).fields
    except ValueError as e:
        raise DataError(f"Column mapping: {e}") from None


def _inspect(ctx, path: Path, name: str, model: str | None, max_len: Any, fields: Any = None) -> dict[str, Any]:
    ml = int(max_len if max_len not in (None, "") else TrainConfig().max_len)
    if ml < 8:
        raise DataError("Max length must be at least 8 tokens.")
    mapping = column_mapping(fields)
    tok = ctx.tokenizers.get((model or "").strip() or ctx.default_model)
    return inspect(path, name, tok, ml, ctx.max_upload_bytes, mapping, inside(ctx.data_dir, TOKENISED))


def upload_dataset(ctx, file_path: str, name: str | None = None, model: str | None = None,
                   max_len: Any = None, fields: Any = None) -> dict[str, Any]:
    """Store an uploaded file (.json, .jsonl, .csv or .parquet) under DATA/uploads/ (generated name) and inspect
    it with the column mapping ``fields``. Raises DataError (a ValueError) with one sentence when the file cannot
    be used; nothing else changes then."""
    name = name or Path(str(file_path)).name
    column_mapping(fields)  # a bad mapping stores nothing
    stored, new = store_upload(ctx.uploads_dir, file_path, name, ctx.max_upload_bytes)
    try:
        return _inspect(ctx, stored, name, model, max_len, fields)
    except Exception:
        if new:  # a refused file is not kept: it would only clutter the Experiment tab's dataset list
            stored.unlink(missing_ok=True)
        raise


def reopen_dataset(ctx, path: str, model: str | None = None, max_len: Any = None, fields: Any = None) -> dict[str, Any]:
    """Inspect again a dataset the studio holds: a stored upload or a bundled sample, by its path (a reloaded page
    gets its dataset back). Any other path is refused."""
    try:
        stored = Path(_dataset_path(ctx, path))
    except ValueError as e:
        raise DataError(str(e)) from None
    samples = {p.resolve(): n for n, p in ctx.samples().items()}
    return _inspect(ctx, stored, samples.get(stored) or shown_name(stored), model, max_len, fields)


def use_sample(ctx, name: str, model: str | None = None, max_len: Any = None, fields: Any = None) -> dict[str, Any]:
    """Inspect a bundled sample by file name."""
    path = ctx.samples().get(name or "")
    if path is None:
        raise DataError(f"Unknown sample {name!r}; choose one of {', '.join(ctx.samples())}.")
    return _inspect(ctx, path, name, model, max_len, fields)


# ---- Monitor and Runs tabs ---------------------------------------------------------------------------------


def _get(ctx, run_id: Any):
    if not run_id or not isinstance(run_id, str):
        raise ValueError("Choose a run first.")
    return ctx.store.require(run_id)


def run_status(ctx, run_id: str) -> dict[str, Any]:
    """Machine-readable state of a run; {"status": "missing"} for an unknown or malformed id."""
    try:
        run = ctx.store.get(run_id) if run_id and isinstance(run_id, str) else None
    except ValueError:
        run = None
    if run is None:
        return {"status": "missing"}
    events = ctx.metrics.events(run.dir)
    s = summarize(events)
    return {"id": run.id, "name": run.name, "status": run.status, "reason": run.reason,
            "step": s.get("steps"), "total_steps": s.get("total_steps"), "loss": s.get("final_loss"),
            "eval_loss": s.get("final_eval_loss"), "position": ctx.jobs.position(run.id),
            "events": len(of_type(events, "step"))}


def list_runs(ctx) -> list[dict[str, Any]]:
    """run_status of every run, newest first."""
    return [run_status(ctx, r.id) for r in ctx.store.list()]


def run_detail(ctx, run_id: str) -> dict[str, Any]:
    """run_status plus the run's facts and core's summary of its metrics (``summary``); KeyError when unknown."""
    run = _get(ctx, run_id)
    return {**run_status(ctx, run.id), "method": run.method, "model": run.model, "created": run.created,
            "started": run.started, "finished": run.finished, "duration_s": run.duration_s,
            "has_adapter": run.has_adapter, "eval_metrics": dict(run.eval_metrics), "config": dict(run.config),
            "summary": summarize(ctx.metrics.events(run.dir))}


def run_events(ctx, run_id: str, event_type: str | None = None, since_step: int = 0) -> list[dict[str, Any]]:
    """The run's metric events (core.events' schema), optionally of one type and after a step."""
    run = _get(ctx, run_id)
    events = of_type(ctx.metrics.events(run.dir), event_type) if event_type else ctx.metrics.events(run.dir)
    return [e for e in events if not since_step or (e.get("step") or 0) > since_step]


def resume_run(ctx, run_id: str) -> dict[str, Any]:
    """Queue a finished run again; it continues from its last checkpoint."""
    run = _get(ctx, run_id)
    ctx.jobs.resume(run.id)
    pos = ctx.jobs.position(run.id)
    return {"id": run.id, "name": run.name, "position": pos if pos and ctx.jobs.running() else None}


def rename_run(ctx, run_id: str, name: str) -> str:
    """The run's new (cleaned) name."""
    return ctx.store.rename(_get(ctx, run_id).id, name)


def delete_check(ctx, run_id: str) -> dict[str, Any]:
    """Whether a run may be deleted now: {"name", "deletable", "reason"} (an active run must be stopped first)."""
    run = _get(ctx, run_id)
    reason = f"{run.name} is {run.status}; stop it before deleting it." if run.active else ""
    return {"id": run.id, "name": run.name, "deletable": not run.active, "reason": reason}


def delete_run(ctx, run_id: str) -> str:
    """Delete a finished run and its folder; returns its name."""
    run = _get(ctx, run_id)
    ctx.store.delete(run.id)
    ctx.metrics.forget(run.dir)
    return run.name


def evaluate_run(ctx, run_id: str) -> dict[str, Any]:
    """Start scoring a finished run on its held-out rows, in the background (``python -m core eval``).
    Returns {"id", "name", "status": "running"}; ``evaluation`` tells how it goes."""
    run = _get(ctx, run_id)
    ctx.evaluations.start(ctx.store, run.id)
    return {"id": run.id, "name": run.name, "status": "running"}


def evaluation(ctx, run_id: str, wait_s: float = 0.0) -> dict[str, Any]:
    """How the run's on-demand evaluation stands: {"status": "none" | "running" | "done" | "failed", "message",
    "event"}; waits up to ``wait_s`` seconds for a running one to end."""
    run = _get(ctx, run_id)
    state = ctx.evaluations.wait(run.id, wait_s) if wait_s > 0 else ctx.evaluations.state(run.id)
    if state is None:
        return {"status": "none", "message": "", "event": None}
    return {"status": state.status, "message": state.message, "event": state.event}


def run_evaluation(ctx, run_id: str) -> dict[str, Any]:
    """What a run's view shows of its held-out evaluation: {"metrics": the registry's (the last full eval event's
    numbers, {} before any), "confusion", "labels" (classification), "examples": the worst rows of
    eval_examples.jsonl (prompt, reference, answer, score)}."""
    run = _get(ctx, run_id)
    last = next((e for e in reversed(of_type(ctx.metrics.events(run.dir), "eval")) if "task_metric" in e), {})
    return {"metrics": dict(run.eval_metrics), "confusion": last.get("confusion"), "labels": last.get("labels"),
            "examples": read_examples(run.dir)}


# ---- Chat tab ----------------------------------------------------------------------------------------------


def chat_columns(ctx, run_ids: list[str] | None, include_base: bool, model: str | None) -> tuple[str, list[Column]]:
    """(base model, columns): the base model (when asked, or when no run is chosen) and up to four runs."""
    chosen = [ctx.store.get(i) for i in (run_ids or [])][:4]
    chosen = [r for r in chosen if r is not None]
    models = {r.model for r in chosen}
    if len(models) > 1:
        raise ValueError(f"The selected runs use different base models ({', '.join(sorted(models))}); "
                         "compare runs of one base model at a time.")
    model = chosen[0].model if chosen else ((model or "").strip() or ctx.default_model)
    from .format import knobs_text  # noqa: PLC0415 - labels only; format imports gradio for user_error

    out = [Column("base", t("chat.base_label", model=model), None)] if include_base or not chosen else []
    out += [Column(r.id, f"{r.name} · {knobs_text(r)}", r.adapter_dir) for r in chosen]
    return model, out


def chat_start(ctx, text: str, run_ids: list[str] | None, include_base: bool, model: str | None,
               histories: dict[str, list[dict]] | None = None) -> dict[str, Any]:
    """Add the user's message to every column's history. Returns {"note", "job", "histories"}; ``job`` (None
    for an empty message) is what chat_reply answers."""
    text = text or ""
    hist = {k: list(v) for k, v in (histories or {}).items()}
    if not text.strip():
        return {"note": localize("Type a message first."), "job": None, "histories": hist}
    note = ""
    if len(text) > MAX_PROMPT_CHARS:
        note = localize(f"Your message has {len(text):,} characters; only the first {MAX_PROMPT_CHARS:,} were sent "
                        "(the model's context could not hold more).")
        text = text[:MAX_PROMPT_CHARS]
    model_name, cs = chat_columns(ctx, run_ids, include_base, model)
    for c in cs:
        hist.setdefault(c.key, []).append({"role": "user", "content": text})
    job = {"model": model_name, "columns": [[c.key, c.label, str(c.adapter) if c.adapter else None] for c in cs]}
    return {"note": note, "job": job, "histories": hist}


def chat_reply(ctx, job: dict, histories: dict[str, list[dict]], temperature: float = 0.0, top_p: float = 0.9,
               max_new_tokens: int = 128, system: str = "", merged: bool = False) -> Iterator[dict[str, Any]]:
    """Stream every column's answer: {"column", "key", "text", "stats", "done"} per piece. The answers are
    appended to ``histories`` (a copy is in each final piece as "history")."""
    settings = GenerationSettings(max_new_tokens=int(max_new_tokens or 128), temperature=float(temperature),
                                  top_p=float(top_p), system=system or "")
    cs = [Column(k, lab, Path(a) if a else None) for k, lab, a in job["columns"]]
    for r in ctx.chat.reply(job["model"], cs, [histories[c.key] for c in cs], settings, merged=merged):
        key = cs[r.column].key
        piece = {"column": r.column, "key": key, "text": r.text, "stats": r.stats, "done": r.done}
        if r.done:
            histories[key] = histories[key] + [{"role": "assistant", "content": r.text}]
            piece["history"] = list(histories[key])
        yield piece


def chat(ctx, text: str, run_ids: list[str] | None, include_base: bool = True, model: str | None = None,
         **settings: Any) -> dict[str, dict[str, str]]:
    """One message, every column's whole answer: {column key: {"text", "stats"}} (for scripts and the API)."""
    started = chat_start(ctx, text, run_ids, include_base, model)
    if started["job"] is None:
        raise ValueError(started["note"])
    out: dict[str, dict[str, str]] = {}
    for piece in chat_reply(ctx, started["job"], started["histories"], **settings):
        if piece["done"]:
            out[piece["key"]] = {"text": piece["text"], "stats": piece["stats"]}
    return out


# ---- Export tab --------------------------------------------------------------------------------------------


def export_adapter(ctx, run_id: str) -> dict[str, Any]:
    """Zip a finished run's adapter: {"path", "bytes", "snippet", "name"}."""
    run = _get(ctx, run_id)
    path = adapter_zip(ctx.exports_dir, run)
    return {"path": str(path), "bytes": path.stat().st_size, "snippet": loading_snippet(run), "name": run.name}


def export_merged(ctx, run_id: str) -> dict[str, Any]:
    """Bake a mergeable run into a plain model folder (and its zip): {"folder", "archive", "snippet", "name"}."""
    run = _get(ctx, run_id)
    folder, archive = merged_model(ctx.exports_dir, run)
    return {"folder": str(folder), "archive": str(archive) if archive else None,
            "snippet": loading_snippet(run, folder), "name": run.name, "can_merge": can_merge(run)}


def export_gguf(ctx, run_id: str, encoding: str = "f16") -> dict[str, Any]:
    """Merge a run into its base model and write it as one GGUF file (f16 or q8_0; Llama family and Qwen2):
    {"path", "bytes", "name", "encoding", "snippet"}."""
    run = _get(ctx, run_id)
    path = gguf_file(ctx.exports_dir, run, encoding)
    return {"path": str(path), "bytes": path.stat().st_size, "name": run.name, "encoding": encoding,
            "snippet": gguf_snippet(path)}


__all__ = [
    "BY_KEY", "ENTRIES", "Entry", "FORM_IDS", "advise", "apply_advice", "build_config", "chat", "chat_reply",
    "chat_start", "check", "delete_check", "delete_run", "entry_for", "evaluate_run", "evaluation", "export_adapter",
    "export_gguf", "export_merged", "list_runs", "name_hint", "run_detail", "run_evaluation", "run_events",
    "submit_config",
    "form_defaults", "knob_id", "param_name", "PARAM_IDS", "rename_run", "resume_run", "run_status", "start_run", "stop_run", "upload_dataset",
    "use_sample",
]
