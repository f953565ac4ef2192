"""The run lifecycle: setup -> a loop of small named steps -> one ending. It yields metric events.

    for event in train(cfg, Path("runs/demo")):
        print(event)

The CLI (``python -m core train``), the studio's worker and the tests all drive it like this. Every event is
also appended, one JSON object per line, to ``<run>/metrics.jsonl``, and ``<run>/status.json`` is rewritten
atomically at every event; the schema of both (and the readers) is core.events. ``<run>/train.log`` gets the
same story in human-readable lines.

How it is built
---------------
``_open_session`` joins the process group and installs the stop handlers (what ``train`` must undo in any
case); ``_setup`` loads data, model and method, builds the optimiser, restores a checkpoint and returns a
``RunState``. ``_loop`` runs optimiser steps through small named functions (``_schedule``,
``_accumulate_gradients``, ``_read_metrics``, ``_optimizer_step``, ``_step_event``, ``_eval_due`` /
``_eval_event``, ``_stop_check``, ``_periodic_checkpoint``) and returns an ``Ending``. ``_decide`` is the one failure policy:
it turns the loop's ending or any exception into the run's final status and reason. ``_wrap_up`` does the
final eval (``_final_eval``: every metric of core.evaluate, the worst answers to ``<run>/eval_examples.jsonl``)
and saves what a run that did not fail leaves behind.

What the loop guarantees
------------------------
* Loss normalisation: the gradient of one optimiser step is that of (Σ token losses) / (Σ supervised tokens)
  over all ``grad_accum`` micro-batches (and all ranks), so grad accumulation changes nothing but memory.
* LR: every step, each AdamW group gets ``initial_lr · lr_multiplier(step)`` (core.schedules); ``initial_lr``
  already holds the LLRD factor of its depth. Gradual unfreezing switches ``requires_grad`` of whole groups
  (core.schedules.apply_unfreezing), so a held-back group gets no gradient and AdamW leaves it untouched.
* Checkpoints (``save_every`` steps, on stop, and at the end) go to ``<run>/checkpoints/step-N/`` atomically,
  the last two kept (layout in core.checkpoint). ``resume=True`` restores parameters, AdamW state, the data
  position and every RNG, so stop + resume ends with the same weights as one uninterrupted run.
* Failures the user can act on end the run with status failed and a reason saying what to do, not a
  traceback (that goes to train.log): out of memory (smaller batch, grad_checkpointing, a PEFT method), a
  full or failing disk while checkpointing (the previous checkpoint stays intact: writes are atomic).
  Config values that do not fit the model are refused before anything loads (``preflight``).
* A NaN/inf loss or gradient stops the run (status failed, the reason names the step). The check runs at
  every logged step before the optimiser step, and before anything is saved, so no poisoned checkpoint or
  adapter is ever written.
* Stop requests: SIGTERM, SIGINT, or a file ``<run>/STOP``. The run finishes the current step, saves a
  checkpoint and a usable adapter to ``<run>/adapter/``, and ends with status stopped.
* CPU threads: between steps the run follows ``<run>/THREADS``, the share of the cores the studio gives it
  (core.threads).
* No host syncs in the hot loop except at log steps (every ``log_every`` steps) and checkpoints.
* Device: core.models.resolve_device. Precision (TrainConfig.precision, resolved by core.models): under
  bf16-mixed the frozen base is held in bf16, trainable parameters (and so AdamW's state) in fp32, and the
  forward runs under bf16 autocast; under fp32 everything is fp32. ``compile`` wraps the loss computation in
  torch.compile (GPU only). Distributed data parallel under torchrun: see core.dist.
* A worker killed outright cannot record its end: core.events.recover_status settles it as interrupted.
"""

from __future__ import annotations

import errno
import math
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import attention, dist, linear
from .blocks import depth_label, depth_map, find_blocks
from .checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temp,
    save_adapter,
    save_checkpoint,
    set_rng_state,
    training_state,
)
from .config import RunConfig
from .data import TOKENISED, LengthGroupedBatches, load_examples, split
from .evaluate import EvalSettings, evaluate, labels_of, loss_metrics, teacher_forced, write_examples
from .events import (
    METRICS_FILE,
    EndEvent,
    EvalEvent,
    StartEvent,
    Status,
    StepEvent,
    append_event,
    describe,
    parse_line,
    recover_status,
    write_atomic,
    write_status,
)
from .forward import SharedPrefix, packed, piece_budget, pieces, shared_prefix, supervised_loss
from .methods import Method, build_method, spec, spec_of
from .methods.base import RunPlan
from .models import (
    autocast, base_dtype, hold_weights_in, load_model, load_tokenizer, peak_memory_bytes, resolve_device,
    resolve_precision,
)
from .preflight import preflight
from .schedules import apply_unfreezing, describe_groups, lr_multiplier, param_groups
from .threads import ThreadShare

STOP_FILE = "STOP"
PACKED_ON = ("cuda",)  # device types whose micro-batches run as packed rows (``_work``)
Events = Generator[dict[str, Any], None, Any]


def train(
    cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, model: nn.Module | None = None, tokenizer=None
) -> Iterator[dict[str, Any]]:
    """Train ``cfg`` into ``run_dir``, yielding one event per log step (schema: core.events).

    ``model``/``tokenizer`` may be passed in (tests, notebooks); otherwise ``cfg.model`` is loaded. The model is
    changed in place: after the run it carries the trained method.

    Settings that do not fit the model raise ValueError (naming the field) before anything is loaded or written
    (``preflight``). A run that fails for a known reason (out of memory, a full disk, NaN) ends with an ``end``
    event of status failed whose reason says what to do; anything else is raised after status.json says failed."""
    preflight(cfg, model)
    session = _open_session(cfg, Path(run_dir))
    try:
        run = _setup(session, resume, model, tokenizer)
        yield session.files.event(run.start)
        session.files.status("running", run.p.step, run.p.total_steps, "")
        ending = _decide(session, (yield from _loop(run)))
        if ending.status != "failed":
            yield from _wrap_up(run, ending)
    except BaseException as e:  # noqa: BLE001 - the policy decides; what it does not know is raised again
        ending = _decide(session, e)
        if ending.reraise:
            session.files.end(ending.status, session.progress.step, session.progress.total_steps, ending.reason)
            raise
    finally:
        session.close()
    # after cleanup, with any exception and its frames released
    if ending.status == "failed" and session.device.type == "cuda":
        torch.cuda.empty_cache()
    yield session.files.end(ending.status, session.progress.step, session.progress.total_steps, ending.reason)


def _loop(run: RunState) -> Generator[dict[str, Any], None, Ending]:
    """Optimiser steps until ``total_steps``, a stop request or a NaN; yields step and eval events."""
    p, tc = run.p, run.cfg.train
    stream = micro_batches(run.batches, p.consumed)
    if run.rng is not None:
        set_rng_state(run.rng)  # the very RNG state the uninterrupted run had after this step
    p.start_clock()
    run.model.train()
    while p.step < p.total_steps:
        log_now = (p.step + 1) % tc.log_every == 0 or p.step + 1 == p.total_steps
        _schedule(run)
        measured = _accumulate_gradients(run, stream, log_now)
        if log_now:
            metrics = _read_metrics(run, measured)  # the host sync of a log step
            if (nan := _non_finite(metrics, p.step + 1)) is not None:
                return nan
        _optimizer_step(run)
        if log_now:
            yield _step_event(run, metrics)
        if _eval_due(run):
            yield _eval_event(run)
        if (stop := _stop_check(run, log_now)) is not None:
            return stop
        run.session.threads.follow()  # the studio re-splits the cores when chat or another job starts or ends
        if (bad := _periodic_checkpoint(run)) is not None:
            return bad
    return Ending("completed", f"finished {p.total_steps} steps")


# --------------------------------------------------------------------------------------------------------------
# The state setup builds and the loop advances


@dataclass(frozen=True)
class Ending:
    """How a run ends: ``status`` completed | stopped | failed, a ``reason`` for the user, and whether the
    exception that ended it is raised again after status.json says so (errors the user cannot act on)."""

    status: str
    reason: str
    reraise: bool = False


@dataclass
class Progress:
    """The counters the loop advances; the failure policy reads them to say where a run failed."""

    phase: str = "setting up"  # "setting up" | "training" | "finishing"
    step: int = 0  # optimiser steps done
    total_steps: int = 0
    start_step: int = 0  # where this session started (a resumed run: its checkpoint's step)
    consumed: int = 0  # micro-batches drawn so far, all ranks together: the data position
    elapsed_before: float = 0.0  # seconds the sessions before this one trained
    bad: Tensor | None = None  # 0-d bool on the device: a non-finite loss or gradient so far (read without sync)
    tokens_since_log: int = 0
    tokens_total: int = 0  # supervised tokens trained on, all sessions together
    t_start: float = 0.0
    t_last: float = 0.0

    def start_clock(self) -> None:
        self.phase = "training"
        self.t_start = self.t_last = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint records of the loop (core.checkpoint's trainer_state.json)."""
        return {"step": self.step, "micro_batches": self.consumed, "elapsed_s": round(self.elapsed(), 3),
                "supervised_tokens": self.tokens_total}


@dataclass
class Session:
    """What exists from the first moment of ``train``: the device, the process group, the run's files, the
    stop handlers, and ``cleanup``, which undoes whatever setup switched on (in any case, in reverse order)."""

    cfg: RunConfig
    device: torch.device
    world: dist.DistInfo
    files: RunFiles
    stop: StopRequest
    threads: ThreadShare
    progress: Progress = field(default_factory=Progress)
    cleanup: ExitStack = field(default_factory=ExitStack)

    def close(self) -> None:
        self.cleanup.close()


@dataclass
class RunState:
    """What ``_setup`` returns: the model with its method, the optimiser, the data and the wrapped forward."""

    session: Session
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    batches: LengthGroupedBatches
    val_batches: LengthGroupedBatches | None
    loss_module: LossModule  # unwrapped: evaluation runs it directly
    forward: Callable[..., tuple[Tensor, Tensor]]  # loss_module, wrapped in DDP and/or torch.compile
    ddp: nn.Module | None
    parallel: str  # "single", "ddp" or "fsdp" (core.dist.strategy)
    sharded: bool  # FSDP2: ``model``'s tensors are DTensor shards (until _wrap_up gathers them)
    autocast: Callable[[], Any]
    grad_labels: list[tuple[str, list[Tensor]]]  # [(block label, its parameters)] for the grad-norm event
    num_layers: int
    micro_per_step: int  # grad_accum · world_size
    start: StartEvent
    rng: dict[str, Any] | None  # the checkpoint's RNG state, set right before the first step
    tokenizer: Any = None
    data_format: str = ""  # the dataset's format (core.data.FORMATS): which task metrics the final eval gives

    @property
    def shares_prefix(self) -> bool:
        return shares_prefix(self.method, self.session.device, self.parallel == "single", self.cfg.train)

    @property
    def packs(self) -> bool:
        return packs(self.method, self.session.device, self.loss_module.model)

    @property
    def cfg(self) -> RunConfig:
        return self.session.cfg

    @property
    def p(self) -> Progress:
        return self.session.progress

    @property
    def files(self) -> RunFiles:
        return self.session.files


# --------------------------------------------------------------------------------------------------------------
# Setup


def _open_session(cfg: RunConfig, run_dir: Path) -> Session:
    device = resolve_device(cfg.train.device)
    world = dist.init(device)
    device = dist.rank_device(device, world)
    files = RunFiles(run_dir, enabled=world.is_main)
    stop = StopRequest(run_dir, clear=world.is_main)
    threads = ThreadShare(run_dir, device)
    threads.follow()  # the share the studio set before it started this worker
    session = Session(cfg, device, world, files, stop, threads)
    session.cleanup.callback(dist.cleanup, world)
    session.cleanup.callback(stop.restore)
    return session


def _setup(session: Session, resume: bool, model: nn.Module | None, tokenizer) -> RunState:
    """Data, model, method, optimiser, checkpoint: everything the first step needs, and the start event."""
    cfg, tc, files, device, p = session.cfg, session.cfg.train, session.files, session.device, session.progress
    files.status("running", 0, 0, "setting up")
    if session.world.is_main:
        remove_stale_temp(files.run_dir)  # what a killed worker may have left half-written
    seed_everything(tc.seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    batches, val_batches, fmt = _data(session, tokenizer)  # a bad dataset fails before the model loads
    precision = resolve_precision(tc.precision, device)
    dtype = base_dtype(precision)
    if model is None:
        model = load_model(cfg.model, device=device, dtype=dtype, tokenizer=tokenizer)[0]
    hold_weights_in(model.to(device), dtype)
    attention.use(model)  # a model passed in (tests, notebooks) runs the attention load_model gives
    model.requires_grad_(False)
    torch.manual_seed(tc.seed)  # the method's init does not depend on what loading drew from the RNG
    method = build_method(cfg.method, tokenizer=tokenizer)
    method.apply(model)
    linear.use(model)  # the base's layers (a model passed in) and those the method added
    micro_per_step = tc.grad_accum * session.world.world_size
    p.total_steps = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.epochs * len(batches) / micro_per_step))
    model.eval()  # no dropout (and no RNG draws) in a method's preparation pass (FishMask's Fisher, FAR's priming)
    ckpt = latest_checkpoint(files.run_dir) if resume else None
    plan = RunPlan(total_steps=p.total_steps, lr=tc.lr, weight_decay=tc.weight_decay,
                   start_step=checkpoint_step(ckpt) if ckpt is not None else 0)
    method.prepare(model, _training_batches(batches, device), _mean_loss_fn(model, method), plan)
    loss_module = LossModule(model, method)
    parallel = dist.strategy(tc.parallel, method, method.parameter_counts(model)[0], device, session.world)
    optimizer, num_layers = _optimizer(model, method, tc, fp32_master=precision == "bf16-mixed",
                                       shard=loss_module if parallel == "fsdp" else None)
    rng = _restore(session, resume, ckpt, model, optimizer)
    if tc.grad_checkpointing:
        _checkpointing(model, True)
        session.cleanup.callback(_checkpointing, model, False)
    ddp, forward = _wrap_forward(session, loss_module, method.frozen_below(0, 0, num_layers) is not None,
                                 parallel == "ddp")
    trainable, total = method.parameter_counts(model)
    files.log(f"method {method.name}: {trainable:,} trainable of {total:,} parameters; precision {precision}"
              + (f"; {parallel} over {session.world.world_size} processes" if session.world.enabled else ""))
    files.log(describe_groups(optimizer.param_groups))
    start: StartEvent = {
        "type": "start", "step": p.start_step, "total_steps": p.total_steps, "trainable": trainable,
        "total_params": total, "method": method.name, "device": str(device), "world_size": session.world.world_size,
        "num_layers": num_layers, "groups": [{"name": g["name"], "depth": g["depth"]} for g in optimizer.param_groups],
        "train_examples": len(batches.examples), "val_examples": len(val_batches.examples) if val_batches else 0,
        "resumed_from": p.start_step if rng is not None else None,
    }
    return RunState(session, model, method, optimizer, batches, val_batches, loss_module, forward, ddp,
                    parallel, parallel == "fsdp",
                    autocast(precision, device), _grad_norm_labels(model, optimizer, num_layers), num_layers,
                    micro_per_step, start, rng, tokenizer, fmt)


def _data(session: Session, tokenizer) -> tuple[LengthGroupedBatches, LengthGroupedBatches | None, str]:
    """(train batches, validation batches or None, the dataset's format)."""
    cfg, tc = session.cfg, session.cfg.train
    # tokenised once per run: resume and evaluation read <run>/tokenised/ back (core.data.cache)
    examples, report = load_examples(cfg.data, tokenizer, tc.max_len, cache_dir=session.files.run_dir / TOKENISED)
    train_set, val_set = split(examples, cfg.data.val_fraction, cfg.data.val_count, tc.seed)
    if not train_set:
        raise ValueError(f"DataConfig.path = {cfg.data.path!r}: no training examples left after the split")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # batches stay uniformly random (length grouping costs quality) where nothing is padded: packed rows, or
    # length-tight pieces on the CPU (core.forward, _work); other runs pad each batch, so they group by length
    device = session.device.type
    grouped = device != "cpu" and (device not in PACKED_ON or spec_of(cfg.method).virtual_tokens)
    batches = LengthGroupedBatches(train_set, tc.batch_size, tc.seed, pad_id, group=grouped)
    val_batches = LengthGroupedBatches(val_set, tc.batch_size, tc.seed, pad_id, shuffle=False) if val_set else None
    session.files.log(f"{report.summary()}\ndata: {len(train_set)} train / {len(val_set)} val examples")
    return batches, val_batches, report.format


def _optimizer(model: nn.Module, method: Method, tc, fp32_master: bool,
               shard: nn.Module | None = None) -> tuple[torch.optim.Optimizer, int]:
    """AdamW over the LLRD param groups of the method's trainable parameters (core.schedules.param_groups), and
    the number of blocks. ``fp32_master``: trainable weights (and so AdamW's state) in fp32 under a bf16 base.
    ``shard``: the root to shard with FSDP2 first (core.dist.shard), so that AdamW holds the shards."""
    for t in method.trainable_parameters(model).values() if fp32_master else []:
        t.data = t.data.float()
    blocks = find_blocks(model)[1]
    if shard is not None:
        dist.shard(shard, blocks)
    groups = param_groups(model, method.trainable_parameters(model), tc.lr, tc.llrd_decay, tc.weight_decay)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8), len(blocks)


def _restore(session: Session, resume: bool, ckpt: Path | None, model: nn.Module, optimizer) -> dict[str, Any] | None:
    """Load checkpoint ``ckpt`` (the newest one, when resuming): parameters, AdamW state, the data position; set the
    progress counters and trim metrics.jsonl to the checkpoint. Returns the checkpoint's RNG state, or None."""
    files, p = session.files, session.progress
    if resume and ckpt is None:
        files.log("resume: no checkpoint found, starting from step 0")
    state = None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        p.start_step, p.consumed = int(state["step"]), int(state["micro_batches"])
        p.elapsed_before = float(state.get("elapsed_s", 0.0))
        p.tokens_total = int(state.get("supervised_tokens", 0))
        files.log(f"resume: continuing from {ckpt.name}")
    p.step = p.start_step
    p.bad = torch.zeros((), dtype=torch.bool, device=session.device)
    files.restart_metrics(keep_up_to=p.start_step if ckpt is not None else None)
    return state["rng"] if state is not None else None


def _wrap_forward(session: Session, loss_module: LossModule, unfreezing: bool,
                  use_ddp: bool) -> tuple[nn.Module | None, Callable]:
    """(the DDP wrapper or None, the forward the loop calls: DDP and/or torch.compile around ``loss_module``,
    which FSDP2 may already have sharded in place)."""
    device, ddp = session.device, None
    if use_ddp:
        ddp = torch.nn.parallel.DistributedDataParallel(
            loss_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unfreezing,  # held-back groups get no gradient
            broadcast_buffers=False,
        )
    forward = ddp if ddp is not None else loss_module
    if session.cfg.train.compile and device.type == "cuda":
        forward = torch.compile(forward)
    elif session.cfg.train.compile:
        session.files.log("compile: skipped (GPU only)")
    return ddp, forward


# --------------------------------------------------------------------------------------------------------------
# One optimiser step, in the order the loop calls them


@dataclass
class Measured:
    """What one step's forward/backward leaves on the device: the summed loss, the supervised token count of
    the global batch, the per-block gradient norms (log steps only) and the total norm (before clipping)."""

    loss_sum: Tensor
    n_tokens: int
    norms: dict[str, Tensor] | None
    total_norm: Tensor


def _schedule(run: RunState) -> None:
    """This step's learning rates (warmup/decay × each group's LLRD factor) and gradual unfreezing."""
    p, tc, groups = run.p, run.cfg.train, run.optimizer.param_groups
    below = run.method.frozen_below(p.step, p.consumed // len(run.batches), run.num_layers)
    apply_unfreezing(groups, below)
    mult = lr_multiplier(p.step, p.total_steps, tc.warmup_steps, tc.scheduler)
    for g in groups:
        g["lr"] = g["initial_lr"] * mult


def _accumulate_gradients(run: RunState, stream: Iterator, log_now: bool) -> Measured:
    """Forward and backward over this rank's share of ``grad_accum · world_size`` micro-batches, scaled so that
    the gradient is that of (Σ token losses) / (Σ supervised tokens of the global batch); then the gradient
    norms and clipping. Nothing here waits for the device."""
    p, tc, world, device = run.p, run.cfg.train, run.session.world, run.session.device
    group = [next(stream) for _ in range(run.micro_per_step)]
    p.consumed += run.micro_per_step
    n_tokens = sum(b.n_supervised() for b in group)  # CPU tensors: no device sync
    mine = group[world.rank * tc.grad_accum : (world.rank + 1) * tc.grad_accum]
    scale = world.world_size / max(1, n_tokens)  # DDP averages over ranks; we want the global sum
    plans = [_work(b, device, run.shares_prefix, run.packs) for b in mine]  # [(shared prefix length, calls)]
    last = (len(plans) - 1, len(plans[-1][1]) - 1)
    loss_sum = torch.zeros((), device=device)
    for j, (k, calls) in enumerate(plans):
        with run.autocast():  # the prefix every row of the micro-batch starts with, run once
            prefix = SharedPrefix(run.model, run.method, mine[j].input_ids[:1, :k].to(device)) if k else None
        for i, (ids, labels, pos) in enumerate(calls):
            sync = run.ddp.no_sync() if run.ddp is not None and (j, i) != last else nullcontext()
            with sync:
                with run.autocast():
                    part, _ = run.forward(ids.to(device, non_blocking=True), None, labels.to(device, non_blocking=True),
                                          None if pos is None else pos.to(device, non_blocking=True), prefix)
                (part * scale).backward()
            loss_sum += part.detach().float()
        if prefix is not None:
            prefix.backward()
    p.tokens_since_log += n_tokens
    p.tokens_total += n_tokens
    norms = _grad_norms(run.grad_labels) if log_now else None  # before clipping
    clip = tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf  # inf: only measure the norm
    params = [t for g in run.optimizer.param_groups for t in g["params"]]
    total_norm = dist.whole(torch.nn.utils.clip_grad_norm_(params, clip))  # FSDP2: a DTensor until made whole
    p.bad |= ~torch.isfinite(total_norm) | ~torch.isfinite(loss_sum)
    return Measured(loss_sum, n_tokens, norms, total_norm)


def shares_prefix(method: Method, device: torch.device, single: bool, tc) -> bool:
    """Whether micro-batches run the prompt prefix their rows share once (core.forward.SharedPrefix): in one
    process (DDP and FSDP2 reduce gradients during the rows' backward, before the prefix's), not on CUDA's packed
    rows (transformers' varlen attention has no prefix), without activation checkpointing (its replay would extend
    the cache again), for a method that allows it."""
    return method.shares_prefix and single and not tc.grad_checkpointing and device.type not in PACKED_ON


def packs(method: Method, device: torch.device, model: nn.Module) -> bool:
    """Whether micro-batches run as packed rows (core.forward.packed): sequences back to back, no padding. On
    CUDA (PACKED_ON), where transformers keeps attention within each sequence; on the CPU where core.attention
    splits a packed row into its sequences (attention.splits_packed_rows: the families it is tested on); never
    for methods that prepend virtual tokens to each sequence."""
    if method.num_virtual_tokens:
        return False
    return device.type in PACKED_ON or (device.type == "cpu" and attention.splits_packed_rows(model))


def _work(batch, device: torch.device, share: bool,
          pack: bool) -> tuple[int, list[tuple[Tensor, Tensor, Tensor | None]]]:
    """A micro-batch as (k, the (input_ids, labels, position_ids or None) calls the loop makes; core.forward).

    ``share`` (``RunState.shares_prefix``): the k leading tokens all rows have in common (the chat template's
    system prompt) run once, as a SharedPrefix, and the calls hold the rest of each row. ``pack``
    (``RunState.packs``): the rows as packed rows of at most piece_budget's cap, positions continuing after the
    prefix; otherwise length-sorted right-padded pieces, which need no mask at all (SDPA's causal kernel)."""
    cap, overhead = piece_budget(device)
    k = shared_prefix(batch.input_ids, batch.attention_mask, batch.labels) if share else 0
    ids, mask, labels = batch.input_ids[:, k:], batch.attention_mask[:, k:], batch.labels[:, k:]
    if pack:
        return k, packed(ids, mask, labels, cap, start=k)
    return k, [(i, l, None) for i, l in pieces(ids, mask, labels, cap, overhead)]


def _read_metrics(run: RunState, m: Measured) -> tuple[float, dict[str, float]]:
    """(loss per supervised token of the global batch, {block label or "total": gradient norm}): host values."""
    loss_sum = dist.all_reduce_sum(m.loss_sum, run.session.world)
    loss = loss_sum.item() / max(1, m.n_tokens)
    norms = dict(zip(m.norms, torch.stack(list(m.norms.values())).tolist())) if m.norms else {}
    norms["total"] = float(m.total_norm)
    return loss, norms


def _non_finite(metrics: tuple[float, dict[str, float]], step: int) -> Ending | None:
    loss, norms = metrics
    if math.isfinite(loss) and math.isfinite(norms["total"]):
        return None
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    return Ending("failed", f"{what} became NaN/inf at step {step}; the run stopped without saving")


def _optimizer_step(run: RunState) -> None:
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.method.after_step(run.model)
    run.p.step += 1


def _step_event(run: RunState, metrics: tuple[float, dict[str, float]]) -> StepEvent:
    """The step event (written to metrics.jsonl, train.log and status.json), for the step just taken."""
    p, groups = run.p, run.optimizer.param_groups
    now = time.perf_counter()
    lrs = {g["name"]: (g["lr"] if any(t.requires_grad for t in g["params"]) else 0.0) for g in groups}
    by_depth: dict[str, float] = {}
    for g in groups:
        by_depth.setdefault("prompt" if g["depth"] is None else str(g["depth"]), lrs[g["name"]])
    event: StepEvent = {
        "type": "step", "step": p.step, "epoch": round(p.consumed / len(run.batches), 4), "loss": metrics[0],
        "lr": lrs, "lr_by_depth": by_depth, "grad_norm": metrics[1],
        "tokens_per_s": round(p.tokens_since_log / max(now - p.t_last, 1e-9), 1),
        "elapsed_s": round(p.elapsed_before + now - p.t_start, 3),
        "eta_s": round((now - p.t_start) / (p.step - p.start_step) * (p.total_steps - p.step), 1),
        "total_steps": p.total_steps, "supervised_tokens": p.tokens_total,
        "peak_mem_mb": round(peak_memory_bytes(run.session.device) / 2**20, 1),
    }
    run.files.event(event)
    run.files.status("running", p.step, p.total_steps, "")
    p.t_last, p.tokens_since_log = now, 0
    return event


def _eval_due(run: RunState) -> bool:
    """Every ``eval_every`` steps when there is a validation set (the last step evaluates in ``_wrap_up``)."""
    p, every = run.p, run.cfg.train.eval_every
    return run.val_batches is not None and bool(every) and p.step % every == 0 and p.step < p.total_steps


def _eval_event(run: RunState) -> EvalEvent:
    """Mean validation loss per supervised token (written to metrics.jsonl); the model goes back to training."""
    loss = loss_metrics(_eval_totals(run))["eval_loss"]
    run.model.train()
    return run.files.event({"type": "eval", "step": run.p.step, "eval_loss": loss})


def _eval_totals(run: RunState):
    """core.evaluate.teacher_forced over the validation set, sharded over the ranks and summed."""
    world, tc = run.session.world, run.cfg.train
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    model = dist.gathered(run.model) if run.sharded else run.model  # FSDP2: a whole copy, while it evaluates
    totals = teacher_forced(model, run.method, run.val_batches.examples, pad_id, tc.batch_size, run.autocast,
                            (world.rank, world.world_size))
    return dist.all_reduce_sum(totals, world)


def _final_eval(run: RunState) -> EvalEvent:
    """The end-of-run eval event (core.evaluate): the loss metrics over every validation row, and, on rank 0,
    the task metrics of up to ``eval_max_rows`` greedy answers; the worst answers go to eval_examples.jsonl."""
    t0 = time.perf_counter()
    totals = _eval_totals(run)
    event: dict[str, Any] = {"type": "eval", "step": run.p.step, **loss_metrics(totals)}
    if run.session.world.is_main:
        tc = run.cfg.train
        settings = EvalSettings(tc.eval_max_rows, tc.eval_max_new_tokens, max(16, tc.batch_size))
        labels = labels_of(run.batches.examples, run.tokenizer) if run.data_format == "classification" else []
        result = evaluate(run.model, run.tokenizer, run.method, run.val_batches.examples, run.data_format, labels,
                          settings, run.autocast, totals)
        event.update(result.metrics)
        if result.rows:
            write_examples(run.files.run_dir, result.rows)
    event["eval_s"] = round(time.perf_counter() - t0, 3)
    return run.files.event(event)


def _stop_check(run: RunState, log_now: bool) -> Ending | None:
    """A stop request (signal or STOP file) ends the run after this step. Under DDP the ranks must agree, which
    costs a collective, so they only look at log steps."""
    p, world = run.p, run.session.world
    if world.enabled:
        local = run.session.stop.requested() if log_now else None
        agreed = log_now and dist.any_rank(local is not None, world, run.session.device)
        reason = (local or "stop requested on another rank") if agreed else None
    else:
        reason = run.session.stop.requested()
    if reason is None or p.step >= p.total_steps:
        return None
    return Ending("stopped", f"{reason} after step {p.step}")


def _periodic_checkpoint(run: RunState) -> Ending | None:
    """Every ``save_every`` steps (the last step saves in ``_wrap_up``): a checkpoint, unless a NaN/inf was seen,
    which ends the run instead (failed, nothing saved)."""
    p, every = run.p, run.cfg.train.save_every
    if not every or p.step % every or p.step >= p.total_steps:
        return None
    if bool(p.bad):
        return Ending("failed", f"loss or gradient became NaN/inf by step {p.step}; step-{p.step} was not saved")
    _save(run, adapter=False)
    return None


def _save(run: RunState, adapter: bool) -> None:
    """A checkpoint (and the adapter), written by rank 0. Under FSDP2 the tensors are gathered whole first, a
    collective every rank joins; the optimiser's parameters are those of the sharded model in ``loss_module``."""
    model = dist.gathered(run.model) if run.sharded else run.model
    trainable, optimizer_state = training_state(run.loss_module.model, run.optimizer, keep=run.files.enabled)
    run.files.checkpoint(model, run.method, trainable, optimizer_state, run.p.trainer_state(), run.cfg.model)
    if adapter:
        run.files.adapter(model, run.method, run.cfg.model)
    dist.barrier(run.session.world)


# --------------------------------------------------------------------------------------------------------------
# How a run ends


def _decide(session: Session, outcome: Ending | BaseException) -> Ending:
    """The one failure policy: the final status and reason of a run, from what ended its loop.

    * The loop's own ending (completed, stopped, failed on a NaN) stands, except that a NaN/inf seen since the
      last log step fails a run that would otherwise save: no poisoned checkpoint or adapter is written.
    * The caller closing the generator: stopped (the GeneratorExit is raised again).
    * Out of memory, a full or failing disk: failed, with what to do (``run_failure``).
    * Anything else: failed with the error's message, and the exception is raised again (``reraise``).
    Every exception's traceback goes to train.log."""
    p = session.progress
    if isinstance(outcome, Ending):
        if outcome.status != "failed" and p.bad is not None and bool(p.bad):
            return Ending("failed", "loss or gradient became NaN/inf; the adapter was not saved")
        return outcome
    if isinstance(outcome, GeneratorExit):
        return Ending("stopped", "the caller stopped reading events", reraise=True)
    session.files.safe_log(f"error: {type(outcome).__name__}: {outcome}\n{traceback.format_exc()}")
    where = {"setting up": "while setting up", "finishing": f"after step {p.step}"}.get(p.phase,
                                                                                   f"at step {p.step + 1}")
    reason = run_failure(outcome, session.cfg, where, session.device)
    if reason is not None:
        return Ending("failed", reason)
    text = str(outcome) if isinstance(outcome, (ValueError, RuntimeError)) else f"{type(outcome).__name__}: {outcome}"
    return Ending("failed", text or type(outcome).__name__, reraise=True)


def _wrap_up(run: RunState, ending: Ending) -> Events:
    """What a run that did not fail leaves behind: the final eval (completed runs), the last checkpoint and the
    adapter in ``<run>/adapter/``."""
    run.p.phase = "finishing"
    if run.sharded:  # FSDP2: evaluation and saving need every tensor whole (a collective, so on every rank)
        run.model, run.sharded = dist.gathered(run.model), False
    run.model.eval()
    if ending.status == "completed" and run.val_batches is not None:
        yield _final_eval(run)
        run.model.eval()
    _save(run, adapter=True)


def run_failure(e: BaseException, cfg: RunConfig, where: str, device: torch.device) -> str | None:
    """The reason to report for a run failure the user can act on (out of memory, a full or failing disk), or
    None for anything else. ``where`` says when it happened ("at step 3")."""
    text = str(e)
    if isinstance(e, torch.OutOfMemoryError) or isinstance(e, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text.lower()
    ):
        tc = cfg.train
        tips = []
        if tc.batch_size > 1:
            tips.append(f"a smaller batch_size (now {tc.batch_size}; raise grad_accum to keep the effective batch)")
        if not tc.grad_checkpointing:
            tips.append("grad_checkpointing=true")
        if tc.max_len > 128:
            tips.append(f"a shorter max_len (now {tc.max_len})")
        if spec(cfg.method_name).trains_base:
            tips.append(f"a PEFT method such as lora instead of {cfg.method_name}")
        else:
            tips.append("a lighter PEFT method or a smaller rank")
        return f"out of memory on {device.type} {where}; try " + ", ".join(tips)
    if isinstance(e, CheckpointWriteError):
        return str(e)
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        return f"could not write to the run folder {where}: {_write_problem(e)}"
    return None


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def _write_problem(e: OSError) -> str:
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what} (the disk is full: free some space)"
    return what


class CheckpointWriteError(RuntimeError):
    """A checkpoint or the adapter could not be written; the message says which, why, and what is still intact."""


# --------------------------------------------------------------------------------------------------------------
# Pieces the loop uses


class LossModule(nn.Module):
    """(sum of token losses, supervised token count) of a batch: the unit DDP and torch.compile wrap."""

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                position_ids: Tensor | None = None, prefix: SharedPrefix | None = None) -> tuple[Tensor, Tensor]:
        return supervised_loss(self.model, self.method, input_ids, attention_mask, labels, position_ids, prefix)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing on or off: recompute each block's activations in backward."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def micro_batches(batches: LengthGroupedBatches, start: int) -> Iterator:
    """Endless stream of micro-batches, epoch after epoch, starting after ``start`` already consumed ones."""
    n = len(batches)
    epoch, skip = divmod(start, n)
    while True:
        yield from batches.epoch(epoch, skip=skip)
        epoch, skip = epoch + 1, 0


def _training_batches(batches: LengthGroupedBatches, device) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    for b in batches.epoch(0):
        yield b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device)


def _mean_loss_fn(model: nn.Module, method: Method):
    def loss_fn(batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        s, n = supervised_loss(model, method, *batch)
        return s / n.clamp(min=1)

    return loss_fn


def _grad_norm_labels(model: nn.Module, optimizer, num_layers: int) -> list[tuple[str, list[Tensor]]]:
    depths = depth_map(model)
    by_id = {id(p): depths.get(n) for n, p in model.named_parameters()}
    out: dict[str, list[Tensor]] = {}
    for g in sorted(optimizer.param_groups, key=lambda g: -2 if g["depth"] is None else g["depth"]):
        for p in g["params"]:
            out.setdefault(depth_label(by_id.get(id(p)), num_layers), []).append(p)
    return list(out.items())


def _grad_norms(labels: list[tuple[str, list[Tensor]]]) -> dict[str, Tensor]:
    """{block label: L2 norm of its gradients} as 0-d device tensors (no sync here)."""
    out = {}
    for label, ps in labels:
        grads = [dist.whole(p.grad.detach().float().norm()) for p in ps if p.grad is not None]
        if grads:
            out[label] = torch.linalg.vector_norm(torch.stack(grads))
    return out


class StopRequest:
    """SIGTERM / SIGINT (first one: finish the step and save; second SIGINT: abort) or a ``<run>/STOP`` file."""

    def __init__(self, run_dir: Path, clear: bool):
        self.path = run_dir / STOP_FILE
        if clear and self.path.exists():
            self.path.unlink()  # a stale request from an earlier session must not stop this one
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def requested(self) -> str | None:
        if self.signal is not None:
            return f"{self.signal} received"
        if self.path.exists():
            return f"{STOP_FILE} file found"
        return None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class RunFiles:
    """Everything the run writes: metrics.jsonl, status.json, train.log, checkpoints, the adapter (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir = run_dir
        self.enabled = enabled
        self.ended = False
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def restart_metrics(self, keep_up_to: int | None) -> None:
        """A fresh run starts an empty metrics file; a resumed one keeps its start events and the step and eval
        events up to its checkpoint (a line cut off by a crash is dropped)."""
        path = self.run_dir / METRICS_FILE
        if not self.enabled:
            return
        kept = []
        if keep_up_to is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                e = parse_line(line)
                if e is not None and (e["type"] == "start" or e["type"] in ("step", "eval")
                                      and e.get("step", 0) <= keep_up_to):
                    kept.append(line + "\n")
        write_atomic(path, "".join(kept))

    def event(self, e: Any) -> Any:
        if self.enabled:
            append_event(self.run_dir, e)
            self.log(describe(e))
        return e

    def safe_log(self, text: str) -> None:
        """``log`` that never raises (on a full disk, the error being reported matters more than the log)."""
        try:
            self.log(text)
        except OSError:
            pass

    def log(self, text: str) -> None:
        if self.enabled:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
                for line in text.splitlines():
                    f.write(f"{stamp} {line}\n")

    def status(self, status: str, step: int, total_steps: int, reason: str) -> None:
        if self.enabled:
            record: Status = {"status": status, "step": step, "total_steps": total_steps,  # type: ignore
                              "reason": reason, "pid": os.getpid(), "updated": time.time()}
            write_status(self.run_dir, record)

    def end(self, status: str, step: int, total_steps: int, reason: str) -> dict[str, Any]:
        """The final event and status (once)."""
        e: EndEvent = {"type": "end", "step": step, "status": status, "reason": reason}  # type: ignore[typeddict-item]
        if not self.ended:
            self.ended = True
            for write in (lambda: self.event(e), lambda: self.status(status, step, total_steps, reason)):
                try:
                    write()
                except OSError:  # a full disk: the caller still gets the event (the CLI prints the reason)
                    pass
        return e

    def checkpoint(self, model, method, trainable, optimizer_state, state: dict[str, Any], base_model: str) -> None:
        if self.enabled:
            try:
                path = save_checkpoint(self.run_dir, model=model, method=method, trainable=trainable,
                                       optimizer_state=optimizer_state, state=state, base_model=base_model)
            except OSError as e:
                raise self._write_error(f"checkpoint step-{state['step']}", e) from None
            self.log(f"checkpoint: {path.relative_to(self.run_dir)}")

    def adapter(self, model, method, base_model: str) -> None:
        if self.enabled:
            try:
                save_adapter(model, method, self.run_dir / "adapter", base_model=base_model)
            except OSError as e:
                raise self._write_error("the adapter", e) from None
            self.log("adapter: saved to adapter/")

    def _write_error(self, what: str, e: OSError) -> CheckpointWriteError:
        ckpt = latest_checkpoint(self.run_dir)
        kept = f"the previous checkpoint {ckpt.name} is intact and resume continues from it" if ckpt else (
            "no earlier checkpoint exists")
        return CheckpointWriteError(f"could not write {what}: {_write_problem(e)}; {kept}")


__all__ = ["train", "recover_status", "run_failure", "shares_prefix", "LossModule", "StopRequest", "Ending", "RunState",
           "STOP_FILE"]
