"""CLI: python -m core <command>. Every error is one line ``error: ...`` on stderr and a non-zero exit code.

    python -m core train --config run.yaml                       # settings from a file (the studio's worker)
    python -m core train --method lora --data assets/identity_sample.json --max-steps 50 --out runs/demo
    python -m core train --config runs/demo/config.yaml --resume # continue from the last checkpoint
    torchrun --nproc_per_node 2 -m core train --config run.yaml  # data parallel (see core/dist.py)
    python -m core generate --run runs/demo --prompt "Who are you?" [--temperature 0] [--system "..."] [--base]
    python -m core export --run runs/demo --out exported/ [--merge] [--gguf f16|q8_0]
    python -m core eval --run runs/demo [--data held_out.json] [--json]   # held-out loss and task metrics
    python -m core sweep --data assets/qa_sample.jsonl --methods lora,bitfit,adapter --steps 20 --out sweeps/qa
    python -m core sweep --data assets/qa_sample.jsonl --methods lora --knob r=4,8,16 --steps 20 --out sweeps/r
    python -m core inspect --data assets/identity_sample.json [--quick]
    python -m core fetch-default

``train`` takes every field of TrainConfig, DataConfig and the method configs as a flag (``--max-steps``,
``--val-fraction``, ``--r``, ``--num-virtual-tokens``, ...): they are generated from the dataclasses, with their
help texts. Flags override the config file. The resolved config is written to ``<run>/config.yaml``.

Exit codes: 0 done (also after a requested stop), 1 the run failed (NaN loss, out of memory, ...),
2 bad input (a config value, a flag, a dataset, a missing folder), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, get_type_hints

from .config import DataConfig, RunConfig, TrainConfig
from .methods import spec, specs

RUN_CONFIG = "config.yaml"
DATA_FLAG_NAMES = {"path": "data"}  # DataConfig.path is --data
SKIPPED_FIELDS: set[str] = set()  # fields with no flag (none today: dicts take name=value,name=value)


class CliError(Exception):
    """A usage problem; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


# --------------------------------------------------------------------------------------------------------------
# Flags generated from the config dataclasses


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(group, cls, rename: dict[str, str] | None = None, extra_help: dict[str, str] | None = None,
                skip: tuple[str, ...] = ()) -> None:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in SKIPPED_FIELDS or f.name in skip:
            continue
        name = (rename or {}).get(f.name, f.name)
        help_text = f.metadata.get("help", "") + (extra_help or {}).get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, list):
            help_text += f" Comma-separated. Default: {','.join(map(str, default)) or 'none'}."
        else:
            help_text += f" Default: {default!r}."
        kw: dict[str, Any] = {
            "dest": f"{cls.__name__}.{f.name}", "default": argparse.SUPPRESS, "help": _escape(help_text)
        }
        if hints[f.name] is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        else:
            kw.update(metavar=f.name.upper())
        group.add_argument(_flag(name), **kw)


def _escape(help_text: str) -> str:
    """argparse formats help with %: a literal % (e.g. "train[:90%]") must be doubled."""
    return help_text.replace("%", "%%")


def _data_path(value: str) -> str:
    """A local path made absolute (the worker runs elsewhere); a Hub dataset id kept as it is."""
    from .data.sources import is_hub_id

    return value if not value or is_hub_id(value) else str(Path(value).resolve())


def method_knobs() -> dict[str, list[str]]:
    """{knob name: [methods that have it]} over every registered method."""
    knobs: dict[str, list[str]] = {}
    for name, s in specs().items():
        for f in dataclasses.fields(s.config_cls):
            knobs.setdefault(f.name, []).append(name)
    return knobs


def _show(value: Any) -> str:
    return ",".join(map(str, value)) or "none" if isinstance(value, list) else repr(value)


def _add_method_knobs(group) -> None:
    """One flag per knob name; a knob that several methods share lists each method's own default."""
    owners: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for name, s in specs().items():
        for f in dataclasses.fields(s.config_cls):
            owners.setdefault(f.name, []).append((name, f, get_type_hints(s.config_cls)[f.name]))
    for knob, entries in owners.items():
        helps = dict.fromkeys(f.metadata.get("help", "") for _, f, _ in entries)
        defaults = "; ".join(f"{m}: {_show(s.defaults()[knob])}" for m, s in ((m, spec(m)) for m, _, _ in entries))
        help_text = f"{' / '.join(helps)} [default {defaults}]"
        kw: dict[str, Any] = {"dest": f"method.{knob}", "default": argparse.SUPPRESS, "help": _escape(help_text)}
        if entries[0][2] is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        else:
            kw.update(metavar=knob.upper())
        group.add_argument(_flag(knob), **kw)


def resolve_train_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The config file (if any) with the flags on top, validated, and the run folder."""
    config_path = getattr(args, "config", None)
    if config_path:
        if not Path(config_path).is_file():
            raise CliError(f"--config {config_path}: no such file")
        d = RunConfig.load(config_path).to_dict()
    else:
        d = RunConfig().to_dict()
    flags = {k: v for k, v in vars(args).items() if "." in k}
    if getattr(args, "model", None):
        d["model"] = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    if getattr(args, "name", None):
        d["name"] = args.name
    if getattr(args, "method", None) and args.method != d["method"]:
        spec(args.method)  # ValueError naming RunConfig.method and the choices
        d["method"], d["method_config"] = args.method, {}
    knobs = method_knobs()
    for key, value in flags.items():
        section, name = key.split(".", 1)
        if section == "method":
            if d["method"] not in knobs[name]:
                owners = ", ".join(knobs[name])
                raise CliError(f"{_flag(name)} does not apply to method {d['method']!r} (it is a knob of {owners})")
            d["method_config"][name] = value
        elif section == TrainConfig.__name__:
            d["train"][name] = value
        elif section == DataConfig.__name__:
            d["data"][name] = _data_path(value) if name == "path" else value
    cfg = RunConfig.from_dict(d)
    if not cfg.data.path:
        raise CliError("no dataset: pass --data FILE (.json, .jsonl, .csv, .parquet), a datasets folder or a Hub id, "
                       "or set data.path in the config file")
    if getattr(args, "out", None):
        run_dir = Path(args.out)
    elif config_path:
        run_dir = Path(config_path).resolve().parent
    else:
        raise CliError("no run folder: pass --out RUN_DIR (or --config RUN_DIR/config.yaml)")
    return cfg, run_dir


# --------------------------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace) -> int:
    cfg, run_dir = resolve_train_config(args)
    _quiet_transformers()
    from . import dist
    from .events import describe as _describe
    from .preflight import preflight
    from .train import train

    preflight(cfg)  # settings that do not fit the model fail here, before anything is written or loaded
    main_rank = dist.from_env().is_main
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{RUN_CONFIG}.tmp-{os.getpid()}"
        cfg.save(tmp)
        os.replace(tmp, run_dir / RUN_CONFIG)
    bar = None
    if main_rank and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=0, unit="step", dynamic_ncols=True)
    status, reason = "failed", "no end event"
    try:
        for e in train(cfg, run_dir, resume=args.resume):
            if e["type"] == "end":
                status, reason = e["status"], e["reason"]
            if not main_rank:
                continue
            if bar is not None:
                if e["type"] == "start":
                    bar.reset(total=e["total_steps"])
                    bar.update(e["step"])
                elif e["type"] == "step":
                    bar.update(e["step"] - bar.n)
                    bar.set_postfix(loss=f"{e['loss']:.4f}")
                elif e["type"] == "eval":
                    bar.write(_describe(e))
            else:
                print(_describe(e), flush=True)
    finally:
        if bar is not None:
            bar.close()
    if status == "failed":
        raise RunFailed(reason)
    if main_rank:
        where = run_dir / "adapter"
        print(f"{status}: {reason}; adapter in {where}", file=sys.stderr)
    return 0


class RunFailed(Exception):
    """The run ended with status failed (exit 1)."""


def _run_model_name(run: Path, folder: Path, override: str | None) -> str:
    if override:
        return override
    if (run / RUN_CONFIG).is_file():
        return RunConfig.load(run / RUN_CONFIG).model
    from .checkpoint import read_sidecar

    return read_sidecar(folder).get("base_model") or "default"


def cmd_generate(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.exists():
        raise CliError(f"--run {run}: no such folder")
    if not args.prompt.strip():
        raise CliError("--prompt is empty: give the message to answer")
    _quiet_transformers()
    from .checkpoint import load_adapter, read_sidecar
    from .generate import GenerationSettings, adapter_folder, stream
    from .models import load_model

    folder = adapter_folder(run)
    if not args.base:
        read_sidecar(folder)  # a clear error before the model loads
    settings = GenerationSettings.from_dict(
        {k: v for k, v in {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                           "system": args.system, "seed": args.seed}.items() if v is not None}
    )
    model, tokenizer = load_model(_run_model_name(run, folder, args.model), device=args.device)
    method = None if args.base else load_adapter(model, folder)
    out = stream(model, tokenizer, method, [{"role": "user", "content": args.prompt}], settings)
    if out.notice:
        print(f"note: {out.notice}", file=sys.stderr)
    for delta in out:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.exists():
        raise CliError(f"--run {run}: no such folder")
    _quiet_transformers()
    import torch

    from .checkpoint import export_adapter, export_merged, load_adapter, read_sidecar
    from .generate import adapter_folder
    from .models import load_model

    folder = adapter_folder(run)
    sidecar = read_sidecar(folder)
    out = Path(args.out)
    if out.resolve() in (run.resolve(), folder.resolve()):
        raise CliError("--out must be a new folder, not the run or its adapter")
    merge = args.merge or args.gguf is not None
    if merge and not spec(sidecar["method"]).can_merge:
        raise CliError(
            f"method {sidecar['method']} cannot be merged into the base model (it adds virtual tokens, not weight "
            f"changes); export without --merge/--gguf to get the adapter folder"
        )
    from .model_card import write_model_card

    if not merge:
        export_adapter(folder, out)
        write_model_card(out, folder, merged=False)
        print(f"adapter copied to {out}, with a model card (README.md)", file=sys.stderr)
        return 0
    model, tokenizer = load_model(_run_model_name(run, folder, args.model), device="cpu", dtype=torch.float32)
    method = load_adapter(model, folder)
    export_merged(model, method, tokenizer, out)
    write_model_card(out, folder, merged=True)
    print(f"merged model written to {out} (loads with AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    if args.gguf is not None:
        from .gguf_export import export_gguf

        path = export_gguf(out, out / f"model-{args.gguf}.gguf", args.gguf)
        print(f"GGUF written to {path} (llama.cpp, Ollama, LM Studio)", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.is_dir():
        raise CliError(f"--run {run}: no such folder")
    _quiet_transformers()
    from .evaluate import EVAL_EXAMPLES_FILE, evaluate_run

    event, rows = evaluate_run(run, args.data, device=args.device, max_rows=args.max_rows,
                               max_new_tokens=args.max_new_tokens, all_examples=args.all_examples)
    if args.json:
        print(json.dumps(event, indent=2, ensure_ascii=False))
        return 0
    skip = {"type", "step", "labels", "confusion", "task_metric", "task_score"}
    print(f"{event['task_metric']}: {event['task_score']:.4f}  ({event['eval_rows']} rows, {event['eval_s']:.1f} s)")
    for k, v in event.items():
        if k not in skip:
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    if "confusion" in event:
        print("confusion (reference -> predictions): " + json.dumps(event["confusion"], ensure_ascii=False))
    if rows:
        print(f"worst answers in {run / EVAL_EXAMPLES_FILE}; the worst: {rows[0]['answer']!r} for "
              f"{rows[0]['reference']!r} (score {rows[0]['score']})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .advisor import GOALS
    from .models import hardware_class
    from .sweep import SWEEP_FILE, parse_knob, parse_methods, plan_sweep, run_sweep, summarize_folder

    methods = parse_methods(args.methods)
    knob = None
    if args.knob is not None:
        if len(methods) != 1:
            raise CliError(f"--knob varies one method; --methods names {len(methods)} ({', '.join(methods)})")
        knob = parse_knob(args.knob, methods[0])
    if args.steps < 1:
        raise CliError(f"--steps {args.steps}: give the number of optimiser steps every run takes (>= 1)")
    if args.goal not in GOALS:
        raise CliError(f"--goal {args.goal!r}: choose one of {', '.join(GOALS)}")
    out = Path(args.out)
    if (out / SWEEP_FILE).exists():
        raise CliError(f"--out {out} already holds a sweep; choose a new folder")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; choose a new folder")
    from .data.sources import is_hub_id

    if not Path(args.data).exists() and not is_hub_id(args.data):
        raise CliError(f"--data {args.data}: no such file")
    d = RunConfig().to_dict()
    d["model"] = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    d["data"]["path"] = _data_path(args.data)
    d["train"].update(max_steps=args.steps, seed=args.seed, batch_size=args.batch_size, max_len=args.max_len,
                      device=args.device, eval_max_rows=args.eval_max_rows)
    if args.val_fraction is not None:
        d["data"]["val_fraction"] = args.val_fraction
    if args.lr is not None:
        d["train"]["lr"] = args.lr
    runs = plan_sweep(RunConfig.from_dict(d), methods, knob, lr_fixed=args.lr is not None)
    from .preflight import preflight

    _quiet_transformers()
    for r in runs:
        preflight(r.config)  # a setting that does not fit the model fails before the first run starts
    print(f"sweep: {len(runs)} runs of {args.steps} steps each into {out}", file=sys.stderr)

    def progress(r, rc: int) -> None:
        print(f"  {r.name}: {'done' if rc == 0 else f'failed (exit {rc}, see {out / r.name})'}", file=sys.stderr)

    run_sweep(runs, out, knob, args.goal, on_run=progress)
    res = summarize_folder(out, hardware_class())
    from .sweep_report import HEADERS, cell

    shown = ("run", "task_metric", "task_score", "eval_loss", "trainable", "trainable_pct", "train_s",
             "tokens_per_s", "peak_mem_mb", "adapter_mb", "can_merge")
    table = [[HEADERS[c] for c in shown]] + [[cell(r[c]) for c in shown] for r in res.rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(shown))]
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    print(res.verdict["text"])
    print(f"wrote {out / 'results.csv'} and {out / 'report.html'}", file=sys.stderr)
    return 0 if any(r["status"] == "completed" for r in res.rows) else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data.sources import is_hub_id

    if not Path(args.data).exists() and not is_hub_id(args.data):
        raise CliError(f"--data {args.data}: no such file")
    _quiet_transformers()
    from .data import length_stats, load_examples
    from .models import load_tokenizer

    values = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(f"{DataConfig.__name__}.")}
    cfg = DataConfig.from_dict({**values, "path": args.data})
    if args.quick:  # every row checked, nothing tokenised: seconds and little memory even for millions of rows
        from .data import validate_file

        report = validate_file(cfg.path, cfg.format, cfg.fields, cfg.max_bytes, cfg.split, cfg.subset)
        if args.json:
            print(json.dumps({"format": report.format, "total_rows": report.total_rows,
                              "valid_rows": report.valid_rows,
                              "issues": [dataclasses.asdict(i) for i in report.issues]}, indent=2))
        else:
            print(f"format: {report.format}")
            print(report.summary(max_issues=20))
        return 0
    tokenizer = load_tokenizer(args.model)
    examples, report = load_examples(cfg, tokenizer, args.max_len)
    stats = length_stats(examples)
    if args.json:
        print(json.dumps({"format": report.format, "total_rows": report.total_rows, "valid_rows": report.valid_rows,
                          "issues": [dataclasses.asdict(i) for i in report.issues],
                          "truncated_rows": report.truncated_rows, "lengths": stats}, indent=2))
        return 0
    print(f"format: {report.format}")
    print(report.summary(max_issues=20))
    print(
        f"tokens per example (max_len {args.max_len}): min {stats['min']}, mean {stats['mean']:.1f}, "
        f"p50 {stats['p50']}, p90 {stats['p90']}, max {stats['max']}"
    )
    print(f"total tokens {stats['total_tokens']:,}, supervised {stats['supervised_tokens']:,}")
    return 0


def cmd_fetch_default(args: argparse.Namespace) -> int:
    from .models import default_model_dir

    print(default_model_dir())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m core", description="PEFT Studio engine")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser(
        "train",
        help="train a run (flags override --config)",
        description="Train one run. Every config field is a flag; flags override the --config file. Writes "
        "<run>/config.yaml, metrics.jsonl, status.json, train.log, checkpoints/ and adapter/.",
    )
    t.add_argument("--config", help="a run config (.yaml or .json); its folder is the run folder unless --out")
    t.add_argument("--out", help="run folder: config.yaml, metrics.jsonl, status.json, checkpoints/, adapter/")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--method", help=f"one of {', '.join(specs())} (default: lora)")
    t.add_argument("--model", help="base model: 'default' (packaged SmolLM2-135M-Instruct), an HF id or a folder")
    t.add_argument("--name", help="a display name for the run")
    _add_fields(t.add_argument_group("data"), DataConfig, rename=DATA_FLAG_NAMES)
    _add_fields(t.add_argument_group("training"), TrainConfig)
    _add_method_knobs(t.add_argument_group("method knobs (each applies to the methods in brackets)"))
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="stream a reply from a trained run (or its base model)")
    g.add_argument("--run", required=True, help="a run folder or an adapter folder")
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--system", help="system prompt (default: the chat template's)")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", help="most tokens to generate (default 256)")
    g.add_argument("--temperature", help="0 = greedy (default 0.7)")
    g.add_argument("--top-p", dest="top_p", help="nucleus sampling mass (default 0.9)")
    g.add_argument("--seed", help="sampling seed")
    g.add_argument("--base", action="store_true", help="the base model without the adapter")
    g.add_argument("--model", help="override the base model recorded in the run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="copy the adapter, or merge it into the base model (--merge)")
    e.add_argument("--run", required=True, help="a run folder or an adapter folder")
    e.add_argument("--out", required=True, help="the folder to write")
    e.add_argument("--merge", action="store_true", help="write a plain HF model folder with the method folded in")
    e.add_argument("--gguf", choices=["f16", "q8_0"],
                   help="also write the merged model as one GGUF file, model-<encoding>.gguf (Llama family, Qwen2)")
    e.add_argument("--model", help="override the base model recorded in the run")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="score a finished run on held-out rows (loss and task metrics)",
                       description="Greedy answers to the run's validation rows (or every row of --data), scored "
                       "with eval loss, perplexity, token accuracy and the format's task metrics. Appends an eval "
                       "event to <run>/metrics.jsonl and writes the worst answers to <run>/eval_examples.jsonl.")
    v.add_argument("--run", required=True, help="a run folder (config.yaml, adapter/)")
    v.add_argument("--data", help="evaluate on every valid row of this file instead of the run's validation split")
    v.add_argument("--max-rows", dest="max_rows", type=int, help="rows answered by generation (default: the run's)")
    v.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="most tokens per answer")
    v.add_argument("--all-examples", dest="all_examples", action="store_true",
                   help="write every scored row to eval_examples.jsonl, not only the worst 10")
    v.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    v.add_argument("--json", action="store_true", help="print the eval event as JSON")
    v.set_defaults(func=cmd_eval)

    w = sub.add_parser("sweep", help="train several methods (or one knob's values) on one dataset and compare them",
                       description="Every run gets the same data, split, seed and number of optimiser steps; each "
                       "method its own suggested learning rate unless --lr. Runs go one at a time into DIR/<run>/; "
                       "then DIR/results.csv and DIR/report.html (self-contained) hold the leaderboard.")
    w.add_argument("--data", required=True, help=DataConfig.help()["path"])
    w.add_argument("--methods", required=True, help=f"comma-separated, from: {', '.join(specs())}")
    w.add_argument("--knob", help="NAME=V1,V2,... of the one method in --methods, e.g. r=4,8,16")
    w.add_argument("--steps", required=True, type=int, help="optimiser steps every run takes")
    w.add_argument("--out", required=True, help="the sweep folder (new)")
    w.add_argument("--model", default="default", help="base model: 'default', an HF id or a folder")
    w.add_argument("--seed", type=int, default=42, help="seed of every run (default 42)")
    w.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="examples per step (default 8)")
    w.add_argument("--max-len", dest="max_len", type=int, default=512, help="tokens per example (default 512)")
    w.add_argument("--val-fraction", dest="val_fraction", type=float, help="held-out share (default 0.1)")
    w.add_argument("--eval-max-rows", dest="eval_max_rows", type=int, default=200,
                   help="held-out rows answered by generation at the end of each run (default 200)")
    w.add_argument("--lr", type=float, help="one learning rate for every run (default: each method's own)")
    w.add_argument("--goal", default="quality", help="the advisor's goal to compare with (default quality)")
    w.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    w.set_defaults(func=cmd_sweep)

    i = sub.add_parser("inspect", help="detect a dataset's format, validate it, show token lengths")
    i.add_argument("--data", required=True, help=DataConfig.help()["path"])
    i.add_argument("--model", default="default", help="whose tokenizer counts the tokens")
    i.add_argument("--max-len", dest="max_len", type=int, default=512, help="truncation length (default 512)")
    _add_fields(i.add_argument_group("data"), DataConfig, skip=("path", "val_fraction", "val_count"))
    i.add_argument("--quick", action="store_true", help="validate every row without tokenizing (no token lengths)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    f = sub.add_parser("fetch-default", help="dequantise the packaged SmolLM2 once and cache it as safetensors")
    f.set_defaults(func=cmd_fetch_default)
    return p


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def _quiet_transformers() -> None:
    """No 'Loading weights' progress bars from transformers: stderr is for our one-line messages."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ValueError) as e:  # config values, flags, datasets, adapter folders: the user's input
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: run failed: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; set PEFT_STUDIO_DEBUG=1 for the traceback
        if os.environ.get("PEFT_STUDIO_DEBUG"):
            raise
        if type(e).__name__ == "ModelNotFoundError":  # core.models: a model name or folder the user gave
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        kind = "" if isinstance(e, (RuntimeError, OSError)) else f"{type(e).__name__}: "
        print(f"error: {kind}{_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
