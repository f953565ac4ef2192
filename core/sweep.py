"""Compare methods on one dataset: several runs with the same data, split, seed and number of optimiser steps.

Two modes:

    methods   several registered methods, each with its own defaults and suggested learning rate
    knob      one method, one of its knobs at several values (lora r=4,8,16; prefix_tuning num_virtual_tokens=10,20)

    runs = plan_sweep(base, ["lora", "bitfit"])                  # [SweepRun(name, config)], base: a RunConfig
    runs = plan_sweep(base, ["lora"], parse_knob("r=4,8,16"))
    run_sweep(runs, out)                                          # out/<name>/ is an ordinary run folder
    rows = core.leaderboard.leaderboard([out / r.name for r in runs])

Everything but the method (or the one knob) is the base config's: data path, split (val_fraction/val_count),
seed, max_steps, batch size, max_len. The learning rate is each method's suggested one (``MethodSpec.lr``) unless
the base sets ``lr_fixed``: prompt tuning needs a far higher rate than LoRA, and one rate for all would measure
the rate, not the method. Runs go one at a time, each in its own worker process (``python -m core train``), so
each run's peak memory is its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_origin, get_type_hints

from .config import RunConfig, method_config
from .methods import spec, specs

SWEEP_FILE = "sweep.json"  # the plan, in the sweep folder
RESULTS_FILE = "results.csv"
REPORT_FILE = "report.html"
WORKER_LOG = "worker.log"  # the worker's stdout and stderr, in its run folder
MAX_RUNS = 16


@dataclass(frozen=True)
class Knob:
    """One knob of one method at several values (values already coerced to the knob's type)."""

    name: str
    values: tuple[Any, ...]

    def text(self) -> str:
        return f"{self.name}={','.join(map(str, self.values))}"


@dataclass(frozen=True)
class SweepRun:
    name: str  # folder name and label: the method, or "<method>-<knob><value>"
    config: RunConfig


def parse_methods(text: str | list[str]) -> list[str]:
    """"lora,bitfit" (or a list) -> ["lora", "bitfit"]; an unknown, repeated or missing method raises ValueError."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if str(m).strip()]
    if not names:
        raise ValueError(f"no methods given: name at least one of {', '.join(specs())}")
    unknown = [m for m in names if m not in specs()]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}: choose from {', '.join(specs())}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"method {twice[0]!r} is listed twice; list each method once")
    if len(names) > MAX_RUNS:
        raise ValueError(f"{len(names)} methods is too many for one sweep (at most {MAX_RUNS})")
    return names


def parse_knob(text: str, method: str) -> Knob:
    """"r=4,8,16" for ``method`` -> Knob("r", (4, 8, 16)): a scalar knob of that method, each value valid."""
    name, eq, values = (s.strip() for s in str(text).partition("="))
    fields = {f.name for f in dataclasses.fields(spec(method).config_cls)}
    if not eq or not name:
        raise ValueError(f"knob {text!r} is not NAME=V1,V2,...: write e.g. r=4,8,16")
    if name not in fields:
        raise ValueError(f"{name!r} is not a knob of {method}: its knobs are {', '.join(sorted(fields))}")
    hint = get_type_hints(spec(method).config_cls)[name]
    if get_origin(hint) in (list, dict):
        raise ValueError(f"knob {name} of {method} holds a list; a sweep varies a number or a choice")
    parsed = tuple(v.strip() for v in values.split(",") if v.strip())
    if len(parsed) < 2:
        raise ValueError(f"knob {name} needs at least two values to compare, e.g. {name}=4,8")
    if len(parsed) > MAX_RUNS:
        raise ValueError(f"{len(parsed)} values is too many for one sweep (at most {MAX_RUNS})")
    coerced = tuple(getattr(method_config(method, {name: v}), name) for v in parsed)  # ValueError names the field
    if len(set(coerced)) < len(coerced):
        raise ValueError(f"knob {name} lists a value twice; list each value once")
    return Knob(name, coerced)


def knob_choices(method: str) -> dict[str, str]:
    """{knob name: its help text} of the knobs of ``method`` a sweep can vary (numbers and choices)."""
    hints = get_type_hints(spec(method).config_cls)
    out = {}
    for f in dataclasses.fields(spec(method).config_cls):
        hint = hints[f.name]
        if hint in (int, float) or get_origin(hint) is Literal or hint is bool:
            out[f.name] = f.metadata.get("help", "")
    return out


def plan_sweep(base: RunConfig, methods: list[str], knob: Knob | None = None, lr_fixed: bool = False,
               ) -> list[SweepRun]:
    """The runs of a sweep: ``base`` with each method (its default knobs and suggested lr), or, with ``knob``,
    the one method with each value of the knob. Everything else is ``base``'s, so split, seed and steps match."""
    if not base.data.path:
        raise ValueError("no dataset: a sweep needs a dataset to train every run on")
    if base.train.max_steps <= 0:
        raise ValueError("a sweep needs a step budget (max_steps > 0), the same for every run")
    if knob is not None and len(methods) != 1:
        raise ValueError(f"a knob sweep varies one method; {len(methods)} were given ({', '.join(methods)})")
    out = []
    for m in methods:
        values = knob.values if knob is not None else (None,)
        for v in values:
            d = base.to_dict()
            knobs = {} if knob is None else {knob.name: v}
            name = m if knob is None else f"{m}-{knob.name}{v}"
            d.update(method=m, method_config=knobs, name=name)
            if not lr_fixed:
                d["train"]["lr"] = spec(m).lr
            out.append(SweepRun(name, RunConfig.from_dict(d)))
    return out


def sweep_record(runs: list[SweepRun], knob: Knob | None, goal: str) -> dict[str, Any]:
    """What sweep.json holds: the runs in order, the knob (if any), the advisor's goal and the shared settings."""
    first = runs[0].config
    return {"runs": [r.name for r in runs], "methods": list(dict.fromkeys(r.config.method_name for r in runs)),
            "knob": knob.text() if knob else None, "goal": goal, "data": first.data.path, "model": first.model,
            "steps": first.train.max_steps, "seed": first.train.seed, "val_fraction": first.data.val_fraction,
            "val_count": first.data.val_count}


def read_record(out: str | Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(out) / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def worker_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "core", "train", "--config", str(config_path)]


def run_sweep(runs: list[SweepRun], out: str | Path, knob: Knob | None = None, goal: str = "quality",
              on_run: Callable[[SweepRun, int], None] | None = None) -> list[tuple[SweepRun, int]]:
    """Train every run, one worker process at a time, into ``out/<name>/``; returns [(run, exit code)].
    A failed run is recorded (its folder says why) and the sweep goes on. ``on_run(run, rc)`` after each."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(json.dumps(sweep_record(runs, knob, goal), indent=2), encoding="utf-8")
    done = []
    for r in runs:
        run_dir = out / r.name
        run_dir.mkdir(parents=True, exist_ok=True)
        r.config.save(run_dir / "config.yaml")
        with open(run_dir / WORKER_LOG, "w", encoding="utf-8") as log:
            rc = subprocess.run(worker_command(run_dir / "config.yaml"), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        done.append((r, rc))
        if on_run is not None:
            on_run(r, rc)
    return done


@dataclass
class Results:
    rows: list[dict[str, Any]]  # core.leaderboard rows, in run order
    verdict: dict[str, Any]  # core.leaderboard.verdict
    curves: list[tuple[str, list[dict[str, Any]]]]  # (run label, its events) for the loss chart


def results(run_dirs: list[Path], labels: list[str], knob: str | None, goal: str, hardware: str) -> Results:
    """The leaderboard, the advisor's verdict and the loss curves of the runs in ``run_dirs``, all read from the
    run folders. The advisor is asked about the training rows of the first run that started."""
    from .events import read_events
    from .leaderboard import leaderboard, train_examples, verdict

    rows = leaderboard(run_dirs, knob, labels)
    n = next((k for k in map(train_examples, run_dirs) if k is not None), 0)
    return Results(rows, verdict(rows, n, hardware, goal), [(lab, read_events(d)) for lab, d in zip(labels, run_dirs)])


def write_outputs(folder: str | Path, res: Results, settings: dict[str, Any]) -> tuple[Path, Path]:
    """results.csv and report.html in ``folder``; returns their paths."""
    from .leaderboard import write_csv
    from .sweep_report import write_report

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return (write_csv(res.rows, folder / RESULTS_FILE),
            write_report(folder / REPORT_FILE, res.rows, res.curves, res.verdict, settings))


def shared_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The settings every run of a sweep shares, as the report lists them."""
    keys = ("data", "model", "steps", "seed", "val_fraction", "val_count", "knob", "goal")
    return {k: record.get(k) for k in keys if record.get(k) not in (None, "", 0) or k == "seed"}


def summarize_folder(out: str | Path, hardware: str) -> Results:
    """Results of the CLI sweep in ``out`` (its sweep.json lists the runs), written to results.csv and report.html."""
    out = Path(out)
    record = read_record(out)
    if not record.get("runs"):
        raise ValueError(f"{out} holds no sweep ({SWEEP_FILE} is missing or lists no runs)")
    names = list(record["runs"])
    knob = (record.get("knob") or "").partition("=")[0] or None
    res = results([out / n for n in names], names, knob, record.get("goal") or "quality", hardware)
    write_outputs(out, res, shared_settings(record))
    return res
