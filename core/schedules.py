"""Pure schedule functions: the learning rate over time, per layer (LLRD), and the gradual-unfreezing plan.

Depths follow core.blocks: -1 embeddings, 0..L-1 blocks (0 = bottom), L final norm + LM head, None
method-owned (a soft prompt, a prefix table).

How the training loop uses them (the whole contract):

    groups = param_groups(model, method.trainable_parameters(model), cfg.lr, cfg.llrd_decay, cfg.weight_decay)
    print(describe_groups(groups))
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    for step in range(total_steps):
        below = method.frozen_below(step, epoch, num_layers)
        apply_unfreezing(opt.param_groups, below)        # requires_grad off for depth < below
        m = lr_multiplier(step, total_steps, cfg.warmup_steps, cfg.scheduler)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * m                # LLRD factor x schedule
        ... forward, backward, clip ...
        opt.step(); opt.zero_grad(set_to_none=True)
        method.after_step(model)
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from .blocks import depth_label, depth_map, find_blocks

ScheduleKind = Literal["constant", "linear", "cosine"]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: ScheduleKind) -> float:
    """Factor in [0, 1] applied to every group's ``initial_lr`` at optimiser step ``step`` (0-based).

    1) warmup: linear ramp (step+1)/warmup_steps, so the first step already moves and step warmup-1 reaches 1;
    2) constant: 1 from then on;
    3) linear / cosine: decay from 1 at step == warmup_steps to 0 at step == total_steps (the step after the
       last one), 1 − r or ½(1 + cos πr) with r = (step − warmup) / (total − warmup); 0 past the end.
    """
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"kind = {kind!r} is invalid: choose one of 'constant', 'linear', 'cosine'")
    if total_steps < 1:
        raise ValueError(f"total_steps = {total_steps!r} is invalid: must be >= 1")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps = {warmup_steps!r} is invalid: must be >= 0")
    if step < 0:
        raise ValueError(f"step = {step!r} is invalid: must be >= 0")
    # 1) linear warmup
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # 2) constant after warmup
    if kind == "constant":
        return 1.0
    # 3) decay to 0 at total_steps
    ratio = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - ratio
    return 0.5 * (1.0 + math.cos(math.pi * ratio))


def llrd_factor(depth: int | None, num_layers: int, decay: float) -> float:
    """Layer-wise LR decay: lr_l = base_lr · decay^(L−l−1) for block l (so the top block gets base_lr).

    Embeddings (-1) sit one step below block 0: decay^L. Final norm + head (L) and method-owned parameters
    (None) get the full base_lr.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay = {decay!r} is invalid: must be in (0, 1]")
    if depth is None or depth >= num_layers:
        return 1.0
    if depth < 0:
        return decay**num_layers
    return decay ** (num_layers - depth - 1)


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases and norm weights (every tensor with fewer than 2 dims) get no weight decay, as in nanoGPT."""
    return p.ndim < 2


def param_groups(
    model: nn.Module, params: dict[str, nn.Parameter], lr: float, decay: float, weight_decay: float
) -> list[dict]:
    """Explicit AdamW parameter groups: one per depth present, bottom (embeddings) to top, method-owned last.

    With weight_decay > 0 each depth splits into a decayed group (matrices, embeddings) and a no-decay group
    (biases, norm weights). Every group is a dict with keys:
        params        list of parameters
        lr            = initial_lr (the loop rescales it every step with lr_multiplier)
        initial_lr    lr · llrd_factor(depth)
        depth         as in core.blocks
        name          core.blocks.depth_label(depth), plus " (no decay)" for the no-decay half
        weight_decay  weight_decay, or 0.0 for the no-decay half
    Tied weights appear once, at the depth of their first name (SmolLM2's tied head is the embedding: -1).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay = {weight_decay!r} is invalid: must be >= 0")
    num_layers = len(find_blocks(model)[1])
    depths = depth_map(model)
    unknown = [n for n in params if n not in depths]
    if unknown:
        raise ValueError(f"params: {unknown[:3]} are not parameters of this model")
    buckets: dict[tuple[int | None, bool], list[nn.Parameter]] = {}
    for name, p in params.items():
        no_decay = weight_decay > 0 and _no_decay(name, p)
        buckets.setdefault((depths[name], no_decay), []).append(p)

    def order(key: tuple[int | None, bool]) -> tuple[float, bool]:
        depth, no_decay = key
        return (math.inf if depth is None else depth, no_decay)

    groups = []
    for depth, no_decay in sorted(buckets, key=order):
        group_lr = lr * llrd_factor(depth, num_layers, decay)
        groups.append(
            {
                "params": buckets[(depth, no_decay)],
                "lr": group_lr,
                "initial_lr": group_lr,
                "depth": depth,
                "name": depth_label(depth, num_layers) + (" (no decay)" if no_decay else ""),
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return groups


def describe_groups(groups: list[dict]) -> str:
    """One line per group, like nanoGPT's configure_optimizers printout."""
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lr, wd = g["initial_lr"], g["weight_decay"]
        lines.append(f"{g['name']:<20} {len(g['params']):>4} tensors {n:>13,} params  lr {lr:.3e}  wd {wd:g}")
    total = sum(p.numel() for g in groups for p in g["params"])
    lines.append(f"{'total':<20} {sum(len(g['params']) for g in groups):>4} tensors {total:>13,} params")
    return "\n".join(lines)


def unfrozen_from(progress: int, every: int, num_layers: int) -> int:
    """Gradual unfreezing (ULMFiT, Howard & Ruder 2018): the lowest depth that trains after ``progress`` units.

    k = progress // every blocks have been released below the top one:
        k = 0        -> L−1  (top block; the head at depth L always trains)
        k = 1 .. L−1 -> L−1−k (one more block downward)
        k >= L       -> -1   (finally the embeddings)
    """
    if every < 1:
        raise ValueError(f"every = {every!r} is invalid: must be >= 1")
    if num_layers < 1:
        raise ValueError(f"num_layers = {num_layers!r} is invalid: must be >= 1")
    if progress < 0:
        raise ValueError(f"progress = {progress!r} is invalid: must be >= 0")
    released = progress // every
    return max(-1, num_layers - 1 - released)


def group_trains(depth: int | None, below: int | None) -> bool:
    """Whether a parameter group of ``depth`` trains when ``frozen_below`` returned ``below``."""
    return below is None or depth is None or depth >= below


def apply_unfreezing(groups: list[dict], below: int | None) -> list[str]:
    """Set requires_grad on the params of every group: off for depth < below. Returns the names that train.

    A frozen param then gets no gradient (grad None), and AdamW skips it entirely, weight decay included,
    so it stays bit-identical until it is released. Pass ``optimizer.param_groups`` (or ``param_groups``'
    output): only parameters the optimiser owns are touched, so statically frozen ones stay frozen.
    """
    names = []
    for g in groups:
        trains = group_trains(g.get("depth"), below)
        for p in g["params"]:
            p.requires_grad_(trains)
        if trains:
            names.append(g["name"])
    return names
