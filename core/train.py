"""The training loop, written out in one function: setup -> loop -> cleanup. It yields metric events.

    for event in train(cfg, Path("runs/demo")):
        print(event)

The CLI (``python -m core train``), the studio's worker and the tests all drive it like this. Every event is
also appended, one JSON object per line, to ``<run>/metrics.jsonl``; the studio draws its charts from that file.

Events (the schema the studio reads)
------------------------------------
    {"type": "start", "step", "total_steps", "trainable", "total_params", "method", "device", "world_size",
     "num_layers", "groups": [{"name", "depth"}], "train_examples", "val_examples", "resumed_from"}
    {"type": "step",  "step", "epoch", "loss", "lr": {group name: lr}, "lr_by_depth": {depth: lr},
     "grad_norm": {block label: norm}, "tokens_per_s", "elapsed_s", "eta_s", "total_steps"}
    {"type": "eval",  "step", "eval_loss"}
    {"type": "end",   "step", "status": "completed" | "stopped" | "failed" | "interrupted", "reason"}

    step          optimiser steps done (1-based in "step" events); checkpoints are named after it
    epoch         passes over the training set so far, a float (2.5 = half-way through the third epoch)
    loss          mean cross-entropy per supervised token over the step's global batch (all micro-batches
                  and ranks), the same normalisation the gradient uses
    lr            the learning rate each optimiser group used at this step (0 while gradual unfreezing holds
                  the group back); lr_by_depth keys are core.blocks depths as strings ("-1" embeddings, "0".."L-1"
                  blocks, "L" head) or "prompt" for method-owned parameters
    grad_norm     L2 norm of the gradient (before clipping) per block: core.blocks.depth_label, "embed",
                  "block 0" .. "head", "prompt"; plus "total"
    tokens_per_s  supervised tokens per second since the previous step event
    eta_s         seconds left, extrapolated from this session's steps

``<run>/status.json`` is rewritten atomically at every event:
    {"status": "running" | "completed" | "stopped" | "failed", "step", "total_steps", "reason", "pid", "updated"}
A worker killed outright (SIGKILL, the OOM killer) cannot say so: ``recover_status(run_dir)`` turns the
"running" of a dead pid into "interrupted" with the last metrics (and the only "interrupted" end event).
``<run>/train.log`` gets the same story in human-readable lines.

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
* No host syncs in the hot loop except at log steps (every ``log_every`` steps) and checkpoints.
* Device: core.models.resolve_device; on CUDA the base model stays in bf16, trainable parameters are kept in
  fp32 and the forward runs under bf16 autocast. ``compile`` wraps the loss computation in torch.compile
  (GPU only). Distributed data parallel under torchrun: see core.dist.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import dist
from .blocks import depth_label, depth_map, find_blocks
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temp,
    save_adapter,
    save_checkpoint,
    set_rng_state,
)
from .config import RunConfig
from .data import LengthGroupedBatches, load_examples, split
from .forward import piece_budget, pieces, supervised_loss
from .methods import Method, build_method, spec
from .methods.base import RunPlan
from .models import load_model, load_tokenizer, resolve_device
from .preflight import preflight
from .schedules import apply_unfreezing, describe_groups, lr_multiplier, param_groups

STOP_FILE = "STOP"


def train(
    cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, model: nn.Module | None = None, tokenizer=None
) -> Iterator[dict[str, Any]]:
    """Train ``cfg`` into ``run_dir``, yielding one event per log step (schema in the module docstring).

    ``model``/``tokenizer`` may be passed in (tests, notebooks); otherwise ``cfg.model`` is loaded. The model is
    changed in place: after the run it carries the trained method.

    Settings that do not fit the model raise ValueError (naming the field) before anything is loaded or written
    (``preflight``). A run that fails for a known reason (out of memory, a full disk, NaN) ends with an ``end``
    event of status failed whose reason says what to do; anything else is raised after status.json says failed."""
    tc = cfg.train
    run_dir = Path(run_dir)
    preflight(cfg, model)
    device = resolve_device(tc.device)
    world = dist.init(device)
    device = dist.rank_device(device, world)
    files = RunFiles(run_dir, enabled=world.is_main)
    stop = StopRequest(run_dir, clear=world.is_main)
    step, total_steps = 0, 0
    model_, method, checkpointing = model, None, False
    failure, looping = None, False  # failure: the reason of a known run failure (out of memory, disk full)
    try:
        # ---- setup ------------------------------------------------------------------------------------------
        files.status("running", 0, 0, "setting up")
        if world.is_main:
            remove_stale_temp(run_dir)  # what a killed worker may have left half-written
        seed_everything(tc.seed)
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.model)
        examples, report = load_examples(cfg.data, tokenizer, tc.max_len)  # a bad dataset fails before the model loads
        train_set, val_set = split(examples, cfg.data.val_fraction, cfg.data.val_count, tc.seed)
        if not train_set:
            raise ValueError(f"DataConfig.path = {cfg.data.path!r}: no training examples left after the split")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # on CPU each batch runs as length-sorted pieces (core.forward.pieces), which removes the padding that
        # length grouping would save, so batches stay uniformly random there (grouping costs quality)
        batches = LengthGroupedBatches(train_set, tc.batch_size, tc.seed, pad_id, group=device.type != "cpu")
        val_batches = None
        if val_set:
            val_batches = LengthGroupedBatches(val_set, tc.batch_size, tc.seed, pad_id, shuffle=False)
        files.log(f"{report.summary()}\ndata: {len(train_set)} train / {len(val_set)} val examples")
        if model_ is None:
            model_, _ = load_model(cfg.model, device=device, tokenizer=tokenizer)
        model = model_.to(device)
        model.requires_grad_(False)

        torch.manual_seed(tc.seed)  # the method's init does not depend on what loading drew from the RNG
        method = build_method(cfg.method, tokenizer=tokenizer)
        method.apply(model)
        micro_per_step = tc.grad_accum * world.world_size
        n_micro = len(batches)
        if tc.max_steps > 0:
            total_steps = tc.max_steps
        else:
            total_steps = max(1, math.ceil(tc.epochs * n_micro / micro_per_step))
        model.eval()  # no dropout (and no RNG draws) in a method's preparation pass (FishMask's Fisher, FAR's priming)
        plan = RunPlan(total_steps=total_steps, lr=tc.lr, weight_decay=tc.weight_decay)
        method.prepare(model, _training_batches(batches, device), _mean_loss_fn(model, method), plan)
        trainable = method.trainable_parameters(model)
        amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
        if amp:  # bf16 base, fp32 trainable weights and optimiser state, bf16 autocast compute
            for p in trainable.values():
                p.data = p.data.float()
        num_layers = len(find_blocks(model)[1])
        groups = param_groups(model, trainable, tc.lr, tc.llrd_decay, tc.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_labels = _grad_norm_labels(model, optimizer, num_layers)  # [(label, [params])]


        start_step, consumed, elapsed_before, resumed_from = 0, 0, 0.0, None
        ckpt = latest_checkpoint(run_dir) if resume else None
        if resume and ckpt is None:
            files.log("resume: no checkpoint found, starting from step 0")
        if ckpt is not None:
            state = load_checkpoint(ckpt, model=model, optimizer=optimizer)
            start_step, consumed = int(state["step"]), int(state["micro_batches"])
            elapsed_before, resumed_from = float(state.get("elapsed_s", 0.0)), start_step
            files.log(f"resume: continuing from {ckpt.name}")
        files.restart_metrics(keep_up_to=start_step if ckpt is not None else None)

        if tc.grad_checkpointing:
            _checkpointing(model, True)
            checkpointing = True
        loss_module: nn.Module = LossModule(model, method)
        ddp = None
        if world.enabled:
            unfreezing = method.frozen_below(0, 0, num_layers) is not None
            ddp = torch.nn.parallel.DistributedDataParallel(
                loss_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=unfreezing,  # held-back groups get no gradient
                broadcast_buffers=False,
            )
        forward = ddp if ddp is not None else loss_module
        if tc.compile and device.type == "cuda":
            forward = torch.compile(forward)
        elif tc.compile:
            files.log("compile: skipped (GPU only)")
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext

        trainable_count, total_count = method.parameter_counts(model)
        files.log(f"method {method.name}: {trainable_count:,} trainable of {total_count:,} parameters")
        files.log(describe_groups(optimizer.param_groups))
        yield files.event(
            {
                "type": "start",
                "step": start_step,
                "total_steps": total_steps,
                "trainable": trainable_count,
                "total_params": total_count,
                "method": method.name,
                "device": str(device),
                "world_size": world.world_size,
                "num_layers": num_layers,
                "groups": [{"name": g["name"], "depth": g["depth"]} for g in optimizer.param_groups],
                "train_examples": len(train_set),
                "val_examples": len(val_set),
                "resumed_from": resumed_from,
            }
        )
        files.status("running", start_step, total_steps, "")

        # ---- loop -------------------------------------------------------------------------------------------
        if ckpt is not None:
            set_rng_state(state["rng"])  # the very RNG state the uninterrupted run had after this step
        stream = micro_batches(batches, consumed)
        bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss/grad so far (no sync)
        t_start = t_last = time.perf_counter()
        tokens_since_log = 0
        end_status, end_reason = "completed", f"finished {total_steps} steps"
        step, looping = start_step, True
        model.train()
        while step < total_steps:
            epoch = consumed // n_micro
            below = method.frozen_below(step, epoch, num_layers)
            apply_unfreezing(optimizer.param_groups, below)
            mult = lr_multiplier(step, total_steps, tc.warmup_steps, tc.scheduler)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * mult

            # one optimiser step = grad_accum micro-batches on each of world_size ranks
            group = [next(stream) for _ in range(micro_per_step)]
            consumed += micro_per_step
            n_tokens = sum(b.n_supervised() for b in group)  # CPU tensors: no device sync
            mine = group[world.rank * tc.grad_accum : (world.rank + 1) * tc.grad_accum]
            scale = world.world_size / max(1, n_tokens)  # DDP averages over ranks; we want the global sum
            # each micro-batch runs as length-sorted, right-padded pieces: no attention mask needed (core.forward)
            work = [p for b in mine for p in pieces(b.input_ids, b.attention_mask, b.labels, *piece_budget(device))]
            loss_sum = torch.zeros((), device=device)
            for i, (ids, labels) in enumerate(work):
                sync = ddp.no_sync() if ddp is not None and i < len(work) - 1 else nullcontext()
                with sync:
                    with autocast():
                        part, _ = forward(ids.to(device, non_blocking=True), None, labels.to(device, non_blocking=True))
                    (part * scale).backward()
                loss_sum += part.detach().float()
            tokens_since_log += n_tokens

            log_now = (step + 1) % tc.log_every == 0 or step + 1 == total_steps
            norms = _grad_norms(grad_labels) if log_now else None  # before clipping
            clip = tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf  # inf: only measure the norm
            total_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            bad |= ~torch.isfinite(total_norm) | ~torch.isfinite(loss_sum)
            if log_now:
                loss_sum = dist.all_reduce_sum(loss_sum, world)
                loss = loss_sum.item() / max(1, n_tokens)  # host sync, at log steps only
                norm_values = dict(zip(norms, torch.stack(list(norms.values())).tolist())) if norms else {}
                norm_values["total"] = float(total_norm)
                if not math.isfinite(loss) or not math.isfinite(norm_values["total"]):
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    end_status = "failed"
                    end_reason = f"{what} became NaN/inf at step {step + 1}; the run stopped without saving"
                    break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(model)
            step += 1

            if log_now:
                now = time.perf_counter()
                done_here = step - start_step
                lrs = {g["name"]: (g["lr"] if _group_trains(g) else 0.0) for g in optimizer.param_groups}
                by_depth: dict[str, float] = {}
                for g in optimizer.param_groups:
                    by_depth.setdefault("prompt" if g["depth"] is None else str(g["depth"]), lrs[g["name"]])
                yield files.event(
                    {
                        "type": "step",
                        "step": step,
                        "epoch": round(consumed / n_micro, 4),
                        "loss": loss,
                        "lr": lrs,
                        "lr_by_depth": by_depth,
                        "grad_norm": norm_values,
                        "tokens_per_s": round(tokens_since_log / max(now - t_last, 1e-9), 1),
                        "elapsed_s": round(elapsed_before + now - t_start, 3),
                        "eta_s": round((now - t_start) / done_here * (total_steps - step), 1),
                        "total_steps": total_steps,
                    }
                )
                files.status("running", step, total_steps, "")
                t_last, tokens_since_log = now, 0

            if val_batches is not None and tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                eval_loss = evaluate(loss_module, val_batches, device, autocast, world)
                yield files.event({"type": "eval", "step": step, "eval_loss": eval_loss})
                model.train()

            if world.enabled:  # ranks must agree; that costs a collective, so only at log steps
                local = stop.requested() if log_now else None
                agreed = log_now and dist.any_rank(local is not None, world, device)
                stop_reason = (local or "stop requested on another rank") if agreed else None
            else:
                stop_reason = stop.requested()
            if stop_reason is not None and step < total_steps:
                end_status, end_reason = "stopped", f"{stop_reason} after step {step}"
                break
            if tc.save_every and step % tc.save_every == 0 and step < total_steps:
                if bool(bad):
                    end_status = "failed"
                    end_reason = f"loss or gradient became NaN/inf by step {step}; step-{step} was not saved"
                    break
                state = _state(step, consumed, elapsed_before + time.perf_counter() - t_start)
                files.checkpoint(model, method, optimizer, state, cfg.model)
                dist.barrier(world)

        # ---- cleanup ----------------------------------------------------------------------------------------
        model.eval()
        if end_status != "failed" and bool(bad):
            end_status, end_reason = "failed", "loss or gradient became NaN/inf; the adapter was not saved"
        if end_status == "completed" and val_batches is not None:
            eval_loss = evaluate(loss_module, val_batches, device, autocast, world)
            yield files.event({"type": "eval", "step": step, "eval_loss": eval_loss})
        if end_status != "failed":
            state = _state(step, consumed, elapsed_before + time.perf_counter() - t_start)
            files.checkpoint(model, method, optimizer, state, cfg.model)
            files.adapter(model, method, cfg.model)
            dist.barrier(world)
        yield files.end(end_status, step, total_steps, end_reason)
    except GeneratorExit:
        files.end("stopped", step, total_steps, "the caller stopped reading events")
        raise
    except BaseException as e:
        files.safe_log(f"error: {type(e).__name__}: {e}\n{traceback.format_exc()}")  # the details, for train.log
        failure = run_failure(e, cfg, f"at step {step + 1}" if looping else "while setting up", device)
        if failure is None:
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, RuntimeError)) else str(e)
            files.end("failed", step, total_steps, reason or type(e).__name__)
            raise
    finally:
        stop.restore()
        if checkpointing:
            _checkpointing(model_, False)
        dist.cleanup(world)
    if failure is not None:  # after cleanup, with the exception and its frames released
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield files.end("failed", step, total_steps, failure)


# --------------------------------------------------------------------------------------------------------------
# After: known failures, runs whose worker died


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


def recover_status(run_dir: str | Path, alive=None) -> dict[str, Any]:
    """Settle a run whose worker died without a word (SIGKILL, the OOM killer, a crash of the machine).

    When ``<run>/status.json`` still says running but its ``pid`` is gone (``alive(pid)`` decides; default:
    the process exists and is not a zombie), status.json is rewritten as ``interrupted`` with the last metrics,
    ``{"status": "interrupted", "step", "total_steps", "reason", "pid", "updated", "last_metrics": {"step",
    "epoch", "loss", "elapsed_s", "eval_loss"}, "checkpoint": "step-N" | None}``, and an ``end`` event with
    status interrupted is appended to metrics.jsonl. ``--resume`` continues from that checkpoint. Returns the
    run's status (unchanged when the worker lives or the run had already ended; {} when there is none)."""
    run_dir = Path(run_dir)
    try:
        status = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(status, dict) or status.get("status") != "running":
        return status if isinstance(status, dict) else {}
    pid = status.get("pid")
    if (alive or _pid_alive)(pid):
        return status
    last: dict[str, Any] = {}
    total = status.get("total_steps", 0)
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue  # the line the kill cut off
        if e.get("type") == "step":
            last.update({k: e.get(k) for k in ("step", "epoch", "loss", "elapsed_s")})
            total = e.get("total_steps", total)
        elif e.get("type") == "eval":
            last["eval_loss"] = e.get("eval_loss")
        elif e.get("type") == "start":
            total = e.get("total_steps", total)
    ckpt = latest_checkpoint(run_dir)
    step = int(last.get("step") or status.get("step") or 0)
    reason = f"the worker (pid {pid}) ended without finishing, after step {step}"
    if last.get("loss") is not None:
        reason += f" (loss {last['loss']:.4f})"
    reason += f"; resume continues from {ckpt.name}" if ckpt is not None else "; no checkpoint was saved"
    new = {"status": "interrupted", "step": step, "total_steps": total, "reason": reason, "pid": pid,
           "updated": time.time(), "last_metrics": last, "checkpoint": ckpt.name if ckpt is not None else None}
    cut = bool(lines) and not (run_dir / "metrics.jsonl").read_bytes().endswith(b"\n")
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:  # after a cut-off line: on a line of its own
        f.write(("\n" if cut else "") + json.dumps({"type": "end", "step": step, "status": "interrupted",
                                                   "reason": reason}) + "\n")
    _write_atomic(run_dir / "status.json", json.dumps(new, indent=2))
    return new


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped) still answers kill(0)
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --------------------------------------------------------------------------------------------------------------
# Pieces the loop uses


class LossModule(nn.Module):
    """(sum of token losses, supervised token count) of a batch: the unit DDP and torch.compile wrap."""

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor]:
        return supervised_loss(self.model, self.method, input_ids, attention_mask, labels)


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


@torch.no_grad()
def evaluate(loss_module: nn.Module, val_batches: LengthGroupedBatches, device, autocast, world) -> float:
    """Mean loss per supervised token over the validation set (sharded over ranks)."""
    loss_module.eval()
    total = torch.zeros(2, device=device)
    for i, b in enumerate(val_batches.epoch(0)):
        if i % world.world_size != world.rank:
            continue
        with autocast():  # right-padded batches: no attention mask needed (core.forward)
            s, n = loss_module(b.input_ids.to(device), None, b.labels.to(device))
        total += torch.stack([s.float(), n.float()])
    dist.all_reduce_sum(total, world)
    return float(total[0] / total[1].clamp(min=1))


def _training_batches(batches: LengthGroupedBatches, device) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    for b in batches.epoch(0):
        yield b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device)


def _mean_loss_fn(model: nn.Module, method: Method):
    def loss_fn(batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        s, n = supervised_loss(model, method, *batch)
        return s / n.clamp(min=1)

    return loss_fn


def _group_trains(group: dict) -> bool:
    return any(p.requires_grad for p in group["params"])


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
        grads = [p.grad.detach().float().norm() for p in ps if p.grad is not None]
        if grads:
            out[label] = torch.linalg.vector_norm(torch.stack(grads))
    return out


def _state(step: int, consumed: int, elapsed: float) -> dict[str, Any]:
    return {"step": step, "micro_batches": consumed, "elapsed_s": round(elapsed, 3)}


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
        """A fresh run starts an empty metrics file; a resumed one keeps the events up to its checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if not self.enabled:
            return
        kept = []
        if keep_up_to is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a crash
                if e.get("type") == "start" or e.get("type") in ("step", "eval") and e.get("step", 0) <= keep_up_to:
                    kept.append(line + "\n")
        _write_atomic(path, "".join(kept))

    def event(self, e: dict[str, Any]) -> dict[str, Any]:
        if self.enabled:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(e) + "\n")
            self.log(_describe(e))
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
            s = {"status": status, "step": step, "total_steps": total_steps, "reason": reason, "pid": os.getpid(),
                 "updated": time.time()}
            _write_atomic(self.run_dir / "status.json", json.dumps(s, indent=2))

    def end(self, status: str, step: int, total_steps: int, reason: str) -> dict[str, Any]:
        """The final event and status (once)."""
        e = {"type": "end", "step": step, "status": status, "reason": reason}
        if not self.ended:
            self.ended = True
            for write in (lambda: self.event(e), lambda: self.status(status, step, total_steps, reason)):
                try:
                    write()
                except OSError:  # a full disk: the caller still gets the event (the CLI prints the reason)
                    pass
        return e

    def checkpoint(self, model, method, optimizer, state: dict[str, Any], base_model: str) -> None:
        if self.enabled:
            try:
                path = save_checkpoint(self.run_dir, model=model, method=method, optimizer=optimizer, state=state,
                                       base_model=base_model)
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _describe(e: dict[str, Any]) -> str:
    """One human-readable line per event, for train.log and the CLI."""
    t = e["type"]
    if t == "start":
        return (f"start: {e['method']} on {e['device']} (x{e['world_size']}), {e['trainable']:,} of "
                f"{e['total_params']:,} parameters train, {e['total_steps']} steps"
                + (f", resumed from step {e['resumed_from']}" if e.get("resumed_from") is not None else ""))
    if t == "step":
        lr = max(e["lr"].values()) if e["lr"] else 0.0
        return (f"step {e['step']}/{e['total_steps']}  epoch {e['epoch']:.2f}  loss {e['loss']:.4f}  lr {lr:.2e}  "
                f"grad {e['grad_norm'].get('total', float('nan')):.3f}  {e['tokens_per_s']:.0f} tok/s  "
                f"eta {_duration(e['eta_s'])}")
    if t == "eval":
        return f"eval at step {e['step']}: loss {e['eval_loss']:.4f}"
    return f"end: {e['status']} at step {e['step']} ({e['reason']})"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


__all__ = ["train", "recover_status", "run_failure", "evaluate", "LossModule", "StopRequest",
           "STOP_FILE"]
