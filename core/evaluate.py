"""Held-out evaluation: loss metrics by teacher forcing, task metrics from batched greedy generation.

    result = evaluate(model, tokenizer, method, val_examples, "qa", train_labels=[], settings=EvalSettings())
    result.metrics   # {"eval_loss", "perplexity", "token_accuracy", "exact_match", "contains", "rouge_l",
                     #  "token_f1", "task_metric", "task_score", "eval_rows", ...}: the fields of the eval event
    result.rows      # every scored row, worst first: {"prompt", "reference", "answer", "score"}

Every format (teacher forcing over all validation rows, one forward each, right-padded):

    eval_loss       Σ CE / Σ supervised tokens (the loss the run trains on)
    perplexity      exp(eval_loss)
    token_accuracy  share of supervised positions t+1 whose token is argmax(logits at t)

Instruction, QA, conversation: the prompt is the example's tokens before its last trained span (exactly what
training rendered, chat template and system prompt included) and the reference is that span decoded without
special tokens (the end-of-turn marker drops out). The first ``max_rows`` rows are answered by greedy decoding
and scored with core.task_metrics: exact_match, contains, rouge_l, token_f1 (means over the rows).
Classification: accuracy and macro_f1 over the labels seen in training, and a confusion table (``confusion``,
``labels``). ``task_metric`` names the headline metric of the format (``TASK_METRIC``) and ``task_score`` is its
value; eval_loss (plain text) is the only one where lower is better (``HIGHER_IS_BETTER``).

Generation is batched and uses the KV cache (core.methods.virtual_tokens.prefill/decode_step, which serve
every method, prompt and prefix ones too): prompts are sorted by length, left-padded into batches of
``batch_size``, and each row's positions are counted from its first real token, so a batched answer equals the
one-by-one answer. A row stops at an end token (core.generate.stop_ids); a batch stops when every row has, or
after ``max_new_tokens``, capped at twice the longest reference of the batch plus 8 tokens (a longer answer
cannot score better on these metrics, and a rambling untrained model would otherwise cost the whole budget).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import model_shape
from .data import IGNORE, Example, collate
from .events import write_atomic
from .forward import CE_CHUNK, hidden_states
from .methods import Method
from .methods.virtual_tokens import decode_step, prefill
from .task_metrics import classify, generative_scores, normalize

EVAL_EXAMPLES_FILE = "eval_examples.jsonl"
WORST = 10  # rows written to eval_examples.jsonl
TASK_METRIC = {"instruction": "rouge_l", "qa": "rouge_l", "conversation": "rouge_l", "classification": "accuracy",
               "text": "eval_loss"}
HIGHER_IS_BETTER = {"eval_loss": False, "perplexity": False, "token_accuracy": True, "exact_match": True,
                    "contains": True, "rouge_l": True, "token_f1": True, "accuracy": True, "macro_f1": True}


@dataclass
class EvalSettings:
    max_rows: int = 200  # validation rows answered by generation (the loss metrics use every row)
    max_new_tokens: int = 64
    batch_size: int = 16  # rows per generation batch


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # worst first


# ---- what an example holds -----------------------------------------------------------------------------------


def last_reply(example: Example) -> tuple[int, int] | None:
    """[start, end) of the example's last trained span, or None when it starts at 0 (plain text: no prompt)."""
    labels = example.labels
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return (start, end) if end > 0 and start > 0 else None


def prompt_and_reference(example: Example, tokenizer) -> tuple[list[int], str] | None:
    """(prompt token ids, reference text) of a chat example, None for plain text."""
    span = last_reply(example)
    if span is None:
        return None
    start, end = span
    return example.input_ids[:start], tokenizer.decode(example.input_ids[start:end], skip_special_tokens=True).strip()


def labels_of(examples: list[Example], tokenizer) -> list[str]:
    """The distinct references (class labels) of ``examples``, most frequent first."""
    counts: dict[str, int] = {}
    for e in examples:
        pr = prompt_and_reference(e, tokenizer)
        if pr is not None:
            counts[pr[1]] = counts.get(pr[1], 0) + 1
    return sorted(counts, key=lambda k: -counts[k])


# ---- teacher forcing ---------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced(
    model: nn.Module, method: Method | None, examples: list[Example], pad_id: int, batch_size: int = 8,
    autocast: Callable[[], Any] = nullcontext, shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """[Σ CE, supervised tokens, argmax hits] over ``examples`` (float64, on the model's device).

    ``shard`` (rank, world size): this process takes every world-size-th batch; the caller sums over ranks."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total = torch.zeros(3, dtype=torch.float64, device=device)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))  # little padding
    rank, world = shard
    was_training = model.training
    model.eval()
    try:
        for k, s in enumerate(range(0, len(order), batch_size)):
            if k % world != rank:
                continue
            b = collate([examples[i] for i in order[s : s + batch_size]], pad_id)
            with autocast():  # right-padded: causal attention alone is exact (core.forward)
                h = hidden_states(model, method, b.input_ids.to(device), None)  # (B, T, d)
            targets = b.labels[:, 1:].to(device)  # (B, T-1)
            keep = targets != IGNORE
            h, targets = h[:, :-1][keep], targets[keep]  # (N, d), (N,)
            for c in range(0, h.shape[0], CE_CHUNK):
                with autocast():
                    z = head(h[c : c + CE_CHUNK]).float()  # (c, V)
                t = targets[c : c + CE_CHUNK]
                total[0] += F.cross_entropy(z, t, reduction="sum").double()
                total[1] += t.numel()
                total[2] += (z.argmax(-1) == t).sum().double()
    finally:
        model.train(was_training)
    return total


def loss_metrics(total: Tensor) -> dict[str, float]:
    """eval_loss, perplexity, token_accuracy from ``teacher_forced``'s (summed) totals."""
    loss_sum, n, hits = (float(x) for x in total)
    loss = loss_sum / max(n, 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": hits / max(n, 1.0)}


# ---- batched greedy generation -----------------------------------------------------------------------------


@torch.no_grad()
def greedy_batch(
    model: nn.Module, method: Method | None, prompts: list[list[int]], max_new_tokens: int, stops: set[int],
    pad_id: int, autocast: Callable[[], Any] = nullcontext,
) -> list[list[int]]:
    """Greedy continuations (stop token excluded) of left-padded ``prompts``, with the KV cache."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with autocast():
        step = prefill(model, method, ids.to(device), mask.to(device))
    for i in range(max_new_tokens):
        tokens = step.logits.argmax(-1)  # (B,)
        for b, t in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if t in stops:
                done[b] = True
            else:
                out[b].append(t)
        if all(done) or i == max_new_tokens - 1:
            break
        with autocast():
            step = decode_step(model, tokens[:, None], step)  # finished rows run on, their tokens unused
    return out


def generate_answers(
    model: nn.Module, tokenizer, method: Method | None, prompts: list[list[int]], max_new_tokens: int,
    batch_size: int = 16, references: list[str] | None = None, autocast: Callable[[], Any] = nullcontext,
) -> list[str]:
    """Greedy answers to token-id prompts, in the prompts' order (see the module docstring for the batching)."""
    from .generate import stop_ids  # noqa: PLC0415 - generate imports checkpoint, which imports us nothing back

    if not prompts:
        return []
    stops = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    context = model_shape(model).max_positions
    m = method.num_virtual_tokens if method is not None else 0
    room = max(1, context - m - max_new_tokens)
    prompts = [p[-room:] for p in prompts]  # a prompt that cannot fit keeps its end, as in chat
    ref_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references] if references else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            budget = max_new_tokens
            if ref_tokens is not None:
                budget = min(budget, 2 * max(ref_tokens[i] for i in idx) + 8)
            new = greedy_batch(model, method, [prompts[i] for i in idx], budget, stops, pad_id, autocast)
            for i, toks in zip(idx, new):
                answers[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


# ---- the whole evaluation ----------------------------------------------------------------------------------


def evaluate(
    model: nn.Module, tokenizer, method: Method | None, examples: list[Example], fmt: str,
    train_labels: list[str] | None = None, settings: EvalSettings | None = None,
    autocast: Callable[[], Any] = nullcontext, loss_totals: Tensor | None = None,
) -> EvalResult:
    """Every metric of ``fmt`` on the held-out ``examples`` (see the module docstring).

    ``loss_totals``: teacher_forced's totals when the caller already has them (summed over ranks)."""
    if fmt not in TASK_METRIC:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(TASK_METRIC)}")
    if not examples:
        raise ValueError("no held-out examples to evaluate")
    settings = settings or EvalSettings()
    t0 = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if loss_totals is None:
        loss_totals = teacher_forced(model, method, examples, pad_id, settings.batch_size, autocast)
    metrics: dict[str, Any] = {"format": fmt, **loss_metrics(loss_totals)}
    rows: list[dict[str, Any]] = []
    pairs = [pr for pr in (prompt_and_reference(e, tokenizer) for e in examples) if pr is not None]
    pairs = pairs[: settings.max_rows] if fmt != "text" else []
    if pairs:
        refs = [r for _, r in pairs]
        answers = generate_answers(model, tokenizer, method, [p for p, _ in pairs], settings.max_new_tokens,
                                   settings.batch_size, refs, autocast)
        prompts = [tokenizer.decode(p, skip_special_tokens=False) for p, _ in pairs]
        if fmt == "classification":
            c = classify(answers, refs, list(train_labels or []))
            metrics.update(accuracy=c.accuracy, macro_f1=c.macro_f1, labels=c.labels, confusion=c.confusion)
            scores = [float(normalize(a) == normalize(r)) for a, r in zip(answers, refs)]
        else:
            per_row = [generative_scores(a, r) for a, r in zip(answers, refs)]
            for name in per_row[0]:
                metrics[name] = sum(d[name] for d in per_row) / len(per_row)
            scores = [d[TASK_METRIC[fmt]] for d in per_row]
        rows = [{"prompt": p, "reference": r, "answer": a, "score": round(s, 4)}
                for p, r, a, s in zip(prompts, refs, answers, scores)]
        rows.sort(key=lambda row: row["score"])
    task = TASK_METRIC[fmt] if TASK_METRIC[fmt] in metrics else "eval_loss"  # eval_max_rows 0: no answers
    metrics.update(task_metric=task, task_score=metrics[task], eval_rows=len(pairs) or len(examples),
                   eval_s=round(time.perf_counter() - t0, 3))
    return EvalResult(metrics, rows)


def write_examples(run_dir: str | Path, rows: list[dict[str, Any]], n: int | None = WORST) -> Path:
    """``<run>/eval_examples.jsonl``: the ``n`` worst rows (all when n is None), worst first; atomic."""
    path = Path(run_dir) / EVAL_EXAMPLES_FILE
    keep = rows if n is None else rows[:n]
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
    return path


def read_examples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<run>/eval_examples.jsonl`` ([] when missing); a cut-off line is skipped."""
    try:
        lines = (Path(run_dir) / EVAL_EXAMPLES_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


# ---- a finished run, on demand (python -m core eval, the studio's Evaluate button) ---------------------------


def evaluate_run(
    run_dir: str | Path, data: str | Path | None = None, *, device: str = "auto", max_rows: int | None = None,
    max_new_tokens: int | None = None, all_examples: bool = False, model: nn.Module | None = None, tokenizer=None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate a run's adapter on its own validation split (the same split, seed and max_len as training), or
    on every valid row of ``data``. Appends the eval event to ``<run>/metrics.jsonl`` (``data`` recorded in it),
    rewrites ``<run>/eval_examples.jsonl`` (the worst rows, every row with ``all_examples``) and returns
    (event, rows worst first). ``max_rows`` / ``max_new_tokens`` default to the run's TrainConfig values.
    ``model``/``tokenizer``: a loaded base model (it gets the adapter applied; tests pass a tiny one).

    ValueError, with one sentence, for a folder that is not a finished run, a missing adapter or bad data."""
    from .checkpoint import load_adapter, read_sidecar  # noqa: PLC0415 - torch-heavy imports only when used
    from .config import RunConfig
    from .data import load_examples, split
    from .events import METRICS_FILE, append_event, pid_alive, read_events, read_status, summarize
    from .models import autocast as precision_autocast
    from .models import base_dtype, load_model, load_tokenizer, resolve_device, resolve_precision

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a run folder (it has no config.yaml)")
    status = read_status(run_dir)
    if status.get("status") == "running" and pid_alive(status.get("pid")):
        raise ValueError(f"run {run_dir.name} is still training; evaluate it when it has finished")
    cfg = RunConfig.load(run_dir / "config.yaml")
    read_sidecar(run_dir / "adapter")  # a clear error before anything loads
    tc = cfg.train
    settings = EvalSettings(tc.eval_max_rows if max_rows is None else int(max_rows),
                            tc.eval_max_new_tokens if max_new_tokens is None else int(max_new_tokens),
                            max(16, tc.batch_size))
    if settings.max_rows < 0 or settings.max_new_tokens < 1:
        raise ValueError("max_rows must be >= 0 and max_new_tokens >= 1")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    own, report = load_examples(cfg.data, tokenizer, tc.max_len)
    train, held_out = split(own, cfg.data.val_fraction, cfg.data.val_count, tc.seed)
    fmt = report.format
    if data is not None:
        if not Path(data).is_file():
            raise ValueError(f"--data {data}: no such file")
        held_out, report = load_examples(dataclasses.replace(cfg.data, path=str(data)), tokenizer, tc.max_len)
    if not held_out:
        raise ValueError(f"run {run_dir.name} has no validation rows (val_fraction 0): pass a file to evaluate on")
    device_ = resolve_device(device)
    precision = resolve_precision(tc.precision, device_)  # the run's own: the numbers its final eval gave
    if model is None:
        model, _ = load_model(cfg.model, device=device_, dtype=torch.float32, tokenizer=tokenizer)
    # held as training held it: under bf16-mixed, the base in bf16 and what the method trained in fp32
    method = load_adapter(model.to(device_), run_dir / "adapter", hold=base_dtype(precision))
    autocast = precision_autocast(precision, device_)
    labels = []
    if report.format == "classification":  # the labels seen in training, or the file's own (another task's run)
        labels = labels_of(train if fmt == "classification" else held_out, tokenizer)
    result = evaluate(model, tokenizer, method, held_out, report.format, labels, settings, autocast)
    step = summarize(read_events(run_dir / METRICS_FILE)).get("steps") or 0
    event = {"type": "eval", "step": step, **result.metrics}
    if data is not None:
        event["data"] = str(Path(data).resolve())
    append_event(run_dir, event)
    write_examples(run_dir, result.rows, None if all_examples else WORST)
    return event, result.rows


__all__ = ["EVAL_EXAMPLES_FILE", "EvalResult", "EvalSettings", "HIGHER_IS_BETTER", "TASK_METRIC", "evaluate",
           "generate_answers", "greedy_batch", "labels_of", "last_reply", "loss_metrics", "prompt_and_reference",
           "read_examples", "teacher_forced", "evaluate_run", "write_examples"]
