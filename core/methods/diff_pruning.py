"""Diff pruning: a sparse, L0-regularised diff on top of the frozen weights (Guo, Rush & Kim 2021, arXiv:2012.07463).

Every targeted weight W₀ (an nn.Linear / GPT-2 Conv1D inside the transformer blocks, same targets as LoRA) gets a
trainable diff w of the same shape and a hard-concrete gate z per entry:

    θ = θ₀ + z ⊙ w                                    w, α: float32, the shape of θ₀ (out, in) (Conv1D: (in, out))
    training:  u ~ U(0, 1),  s = σ(log u − log(1 − u) + α),   z = clamp(s·(r − l) + l, 0, 1)
    eval:      z = clamp(σ(α)·(r − l) + l, 0, 1)       (deterministic; model.eval(), generation, saving)
    l = −1.5, r = 1.5;  w starts at 0 (θ = θ₀ at the start), α at ``alpha_init`` (σ(5) ≈ 0.993: gates open)

and the objective adds λ times the expected number of non-zero gates, a differentiable stand-in for ‖z ⊙ w‖₀:

    L0(α) = Σ_i P(z_i ≠ 0) = Σ_i σ(α_i − log(−l/r))

``structured``: one more gate per tensor (α_g, a (1,) tensor, same law), z_i ← z_i · z_g, so a whole tensor can be
switched off; L0 = σ(α_g − c)·Σ_i σ(α_i − c) with c = log(−l/r).

How the penalty reaches the loss without touching the training loop. core.train sums the token losses of each
step's micro-batches ("pieces", core.forward) and calls backward once per piece, so a term added to the forward
would be added once per piece and scaled by 1/n_tokens. Instead a tensor hook on α adds the penalty's exact
gradient to α's gradient, once per optimiser step: the hook fires in the first backward after ``apply`` or
``after_step`` (a per-layer "pending" flag) and adds

    ∂(λ·L0)/∂α_i = λ·σ'(α_i − c)                      (structured: · σ(α_g − c);  ∂/∂α_g = λ·σ'(α_g − c)·Σ_i σ(α_i − c))

evaluated at the α of this step's forward. Gradient clipping then sees loss + penalty, as in the paper. A loop
that never calls ``after_step`` (a plain test loop) gets the penalty in its first backward only.

α's learning rate. AdamW normalises each entry's step, so scaling α's gradient in a hook would not change its
learning rate. Instead α is stored reparameterised, α = c·α̂ with c = alpha_lr / run lr (set in ``prepare`` from
the RunPlan; c = 1 without prepare): AdamW's step of size ~lr on α̂ moves α by ~alpha_lr. α keeps the schedule
(and the LLRD factor of its block) of the run's lr. The stored α̂ is an implementation detail: adapters hold θ − θ₀.

Projection. At optimiser step ``total_steps − fixed_mask_steps`` (counted in ``after_step``; ``project(model)`` by
hand), each tensor keeps its k = max(1, ⌊sparsity·n + ½⌋) entries of largest |z ⊙ w| (eval gates), so the count is
sparsity·n ± 1 per tensor (per-tensor, not global: every targeted tensor keeps its share). Then

    w ← z ⊙ w at the kept entries, 0 elsewhere;   α ← +100 at the kept entries, −100 elsewhere (α_g ← +100)

so the gate is exactly 1 / 0 in both modes (σ(±100 + logit u) rounds to 1 / 0 in float32 for every u in
[1e-6, 1 − 1e-6]) and θ − θ₀ keeps exactly its values at the kept entries. The remaining ``fixed_mask_steps``
steps train only the kept entries of w: the forward then uses δ = mask ⊙ w (the same numbers as z ⊙ w, without
sampling), so w gets zero gradient off the mask and α none at all (under DDP a zero one), and ``after_step``
re-zeroes w outside the mask and rewrites α after every step, so AdamW's weight decay and momentum move no masked
entry. The base θ₀ never trains (requires_grad is off), so every entry outside the kept set stays bit-identical:
θ₀ + 0 = θ₀. Because the projected state lives in α itself, a run resumed from a checkpoint after the projection stays
projected; a run resumed before it starts counting at the checkpoint's step (``RunPlan.start_step``), so it projects
at the planned step.

Saved as a sparse delta (our own format, as FishMask), two tensors per targeted weight:

    <hf parameter name>.indices   int64 [n]    flat (row-major) positions, ascending
    <hf parameter name>.values    float32 [n]  θ − θ₀ = z ⊙ w (eval gates) at those positions

After the projection these are exactly the kept entries; before it (a mid-run checkpoint) every non-zero entry of
θ − θ₀, so that an adapter always reproduces the model it was saved from. Loading writes the values into w and
sets α to the projected ±100, so the loaded model computes θ₀ + δ exactly as the saved one (same float32 sum).

Merging writes W₀ ← (W₀ + z ⊙ w) in W₀'s dtype, the very tensor the unmerged forward builds, so merged and
unmerged outputs are bit-identical; the overwritten base values are stashed (only the changed entries when they
are few), so ``unmerge`` restores them exactly. ``bake`` merges and puts the plain layers back. In eval mode
without gradients the effective weight is cached per layer (invalidated by any in-place change of θ₀, w or α),
so generation runs at nearly base speed.

Counts. While training, w and α train: 2·Σ n_t entries (+1 per tensor with ``structured``) over the targeted
tensors; after the projection, Σ k_t. ``parameter_counts`` reports the current one over all parameters of the
adapted model (θ₀, w and α), as LoRA counts its A and B.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..config import MethodConfig, knob
from ..linear import linear
from .base import Method, RunPlan
from .lora import find_linears, replace_module
from .registry import MethodSpec, register

L_STRETCH, R_STRETCH = -1.5, 1.5
LOG_RATIO = math.log(-L_STRETCH / R_STRETCH)  # c = log(−l/r) in P(z ≠ 0) = σ(α − c)
PROJECTED = 100.0  # |α| after the projection: the gate is exactly 1 (kept) or 0 (dropped)
U_EPS = 1e-6  # u is drawn from [U_EPS, 1 − U_EPS], so log u − log(1 − u) stays within ±13.9
INDICES, VALUES = ".indices", ".values"


@dataclass
class DiffPruningConfig(MethodConfig):
    method: ClassVar[str] = "diff_pruning"
    sparsity: float = knob(
        0.005, "Fraction of each targeted tensor's entries kept by the final projection (0.005: 1 in 200).", gt=0.0, max=1.0,
        help_zh="最终投影后每个目标张量保留的元素比例（0.005：两百个里留一个）。",
    )
    l0_weight: float = knob(1e-6, "λ: weight of the expected-L0 penalty λ·Σσ(α − log(−l/r)) on the gates.", min=0.0,
                            help_zh="λ：门控上期望 L0 惩罚 λ·Σσ(α − log(−l/r)) 的权重。")
    alpha_init: float = knob(5.0, "Initial gate logit α (5: σ(α) ≈ 0.993, every gate starts open).", min=-20.0, max=20.0,
                             help_zh="门控 logit α 的初始值（5：σ(α) ≈ 0.993，所有门控一开始都打开）。")
    alpha_lr: float = knob(0.1, "Peak learning rate of the gate logits α (the run's lr trains the diff w).", gt=0.0, max=10.0,
                           help_zh="门控 logit α 的峰值学习率（本次训练的 lr 用于差分 w）。")
    targets: list[str] = knob(["all-linear"], "Linears that get a diff: names like q_proj, or 'all-linear'.",
                              help_zh="加差分的线性层：q_proj 之类的名称，或 'all-linear'。")
    structured: bool = knob(False, "Also one gate per tensor (structured diff pruning): z ← z · z_tensor.",
                            help_zh="每个张量再加一个门控（结构化 diff pruning）：z ← z · z_tensor。")
    fixed_mask_steps: int = knob(
        0, "Steps at the end that train only the kept entries (the projection happens before them).", min=0,
        help_zh="最后只训练保留元素的步数（投影发生在这些步之前）。",
    )


def keep_count(numel: int, sparsity: float) -> int:
    """k = max(1, ⌊sparsity·n + ½⌋), at most n."""
    return max(1, min(numel, int(math.floor(sparsity * numel + 0.5))))


def hard_concrete(alpha: Tensor, sample: bool) -> Tensor:
    """z = clamp(s·(r − l) + l, 0, 1), s = σ(log u − log(1 − u) + α) (sample) or σ(α) (deterministic)."""
    if sample:
        u = torch.rand_like(alpha).clamp_(U_EPS, 1.0 - U_EPS)
        alpha = alpha + (torch.log(u) - torch.log1p(-u))
    return (torch.sigmoid(alpha) * (R_STRETCH - L_STRETCH) + L_STRETCH).clamp(0.0, 1.0)


class DiffLinear(nn.Module):
    """Wraps a frozen nn.Linear or Conv1D ``base_layer``: the same layer with weight θ₀ + z ⊙ w.

    ``diff`` (w) and ``gate_logit`` (α̂, with α = alpha_scale·α̂) have the shape of base_layer.weight; with
    ``structured`` a (1,) ``group_logit`` gates the whole tensor. ``mask`` is set once the diff is projected."""

    def __init__(self, base_layer: nn.Module, alpha_init: float, structured: bool, l0_weight: float):
        super().__init__()
        self.base_layer = base_layer
        self.conv1d = isinstance(base_layer, Conv1D)
        w0 = base_layer.weight
        self.diff = nn.Parameter(torch.zeros(w0.shape, dtype=torch.float32, device=w0.device))
        self.gate_logit = nn.Parameter(torch.full(w0.shape, float(alpha_init), dtype=torch.float32, device=w0.device))
        self.group_logit = (
            nn.Parameter(torch.full((1,), float(alpha_init), dtype=torch.float32, device=w0.device)) if structured else None
        )
        self.alpha_scale = 1.0
        self.l0_weight = l0_weight
        self.l0_pending = [True, True]  # add the penalty's gradient to α (entries, group) in the next backward
        self.mask: Tensor | None = None  # bool, weight's shape, after the projection
        self.enabled = True
        self.merged = False
        self._stash: tuple[Tensor | None, Tensor] | None = None  # (flat indices or None, base values) while merged
        self._cache: tuple[tuple, Tensor] | None = None
        self.gate_logit.register_hook(self._entry_penalty)
        if self.group_logit is not None:
            self.group_logit.register_hook(self._group_penalty)
        self.train(base_layer.training)

    # ---- gates and the effective weight ---------------------------------------------------------------------

    def alpha(self) -> Tensor:
        return self.gate_logit * self.alpha_scale

    def group_alpha(self) -> Tensor | None:
        return None if self.group_logit is None else self.group_logit * self.alpha_scale

    def gate(self, sample: bool) -> Tensor:
        """z, the weight's shape (float32)."""
        z = hard_concrete(self.alpha(), sample)
        ga = self.group_alpha()
        return z if ga is None else z * hard_concrete(ga, sample)

    def delta(self, sample: bool = False) -> Tensor:
        """θ − θ₀ = z ⊙ w (float32, the weight's shape). Once projected, z is exactly the 0/1 mask, so the
        same product is computed from the mask: no gate sampling, and α gets no gradient (AdamW skips it)."""
        if self.mask is not None:
            delta = self.mask.to(self.diff.dtype) * self.diff
            if torch.is_grad_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized():
                delta = delta + 0.0 * self.gate_logit.sum()  # DDP wants a gradient (zero) for every parameter
            return delta
        return self.gate(sample) * self.diff

    def expected_l0(self) -> Tensor:
        """Σ_i σ(α_i − c) (· σ(α_g − c) when structured): the expected number of non-zero gates."""
        p = torch.sigmoid(self.alpha() - LOG_RATIO).sum()
        ga = self.group_alpha()
        return p if ga is None else p * torch.sigmoid(ga - LOG_RATIO).sum()

    def effective_weight(self, sample: bool) -> Tensor:
        """(θ₀ + z ⊙ w) in θ₀'s dtype: the float32 sum rounded once, exactly what ``merge`` writes."""
        w0 = self.base_layer.weight
        return (w0.float() + self.delta(sample)).to(w0.dtype)

    def _cache_key(self) -> tuple:
        ts = [self.base_layer.weight, self.diff, self.gate_logit] + ([self.group_logit] if self.group_logit is not None else [])
        return tuple((t.data_ptr(), t._version) for t in ts) + (self.alpha_scale,)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or self.merged:
            return self.base_layer(x)
        if self.training or torch.is_grad_enabled():
            self._cache = None
            weight = self.effective_weight(sample=self.training)
        else:  # eval without gradients (generation, evaluation): reuse the weight until a tensor changes
            key = self._cache_key()
            if self._cache is None or self._cache[0] != key:
                self._cache = None
                self._cache = (key, self.effective_weight(sample=False))
            weight = self._cache[1]
        bias = self.base_layer.bias
        if self.conv1d:  # transformers' Conv1D: x·W + b with W (in, out)
            out = torch.addmm(bias, x.view(-1, x.size(-1)), weight)
            return out.view(x.size()[:-1] + (weight.shape[1],))
        return linear(x, weight, bias)  # core.linear: through oneDNN in fp32 on AVX-512

    # ---- the L0 penalty, as gradient hooks -----------------------------------------------------------------

    def _entry_penalty(self, grad: Tensor) -> Tensor:
        """∂(λ·L0)/∂α̂_i = λ·c_α·σ'(α_i − c)·[σ(α_g − c)], added once per step (see the module docstring)."""
        if not self.l0_pending[0] or self.l0_weight == 0 or self.mask is not None:
            return grad
        self.l0_pending[0] = False
        with torch.no_grad():
            p = torch.sigmoid(self.alpha() - LOG_RATIO)
            g = p * (1 - p) * (self.l0_weight * self.alpha_scale)
            ga = self.group_alpha()
            if ga is not None:
                g = g * torch.sigmoid(ga - LOG_RATIO)
        return grad + g.to(grad.dtype)

    def _group_penalty(self, grad: Tensor) -> Tensor:
        """∂(λ·L0)/∂α̂_g = λ·c_α·σ'(α_g − c)·Σ_i σ(α_i − c)."""
        if not self.l0_pending[1] or self.l0_weight == 0 or self.mask is not None:
            return grad
        self.l0_pending[1] = False
        with torch.no_grad():
            pg = torch.sigmoid(self.group_alpha() - LOG_RATIO)  # type: ignore[operator]
            total = torch.sigmoid(self.alpha() - LOG_RATIO).sum()
            g = pg * (1 - pg) * total * (self.l0_weight * self.alpha_scale)
        return grad + g.to(grad.dtype)

    # ---- projection ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def project(self, sparsity: float) -> None:
        """Keep the k entries of largest |z ⊙ w| (eval gates); gates become exactly 1 there and 0 elsewhere."""
        d = self.delta(sample=False)
        k = keep_count(d.numel(), sparsity)
        mask = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
        mask[torch.topk(d.abs().flatten(), k, sorted=False).indices] = True
        self.set_mask(mask.view(d.shape), torch.where(mask.view(d.shape), d, torch.zeros_like(d)))

    @torch.no_grad()
    def set_mask(self, mask: Tensor, diff: Tensor) -> None:
        """Fix the projected state: w ← diff (0 outside the mask), α ← ±100 by the mask."""
        self.mask = mask
        self.diff.copy_(diff)
        self.hold_mask()

    @torch.no_grad()
    def hold_mask(self) -> None:
        """Re-impose the projected state after an optimiser step (undo weight decay / momentum off the mask)."""
        assert self.mask is not None
        self.diff.masked_fill_(~self.mask, 0.0)
        self.gate_logit.copy_(torch.where(self.mask, PROJECTED, -PROJECTED) / self.alpha_scale)
        if self.group_logit is not None:
            self.group_logit.fill_(PROJECTED / self.alpha_scale)

    def looks_projected(self) -> bool:
        """α holds the projection's ±100 everywhere (a checkpoint restored after the projection)."""
        with torch.no_grad():
            a = self.alpha().abs()
            ga = self.group_alpha()
            return bool((a >= PROJECTED / 2).all()) and (ga is None or bool((ga >= PROJECTED / 2).all()))

    def rescale_alpha(self, scale: float) -> None:
        """Store α = scale·α̂ from now on, leaving α unchanged."""
        with torch.no_grad():
            for p in (self.gate_logit, self.group_logit):
                if p is not None:
                    p.mul_(self.alpha_scale / scale)
        self.alpha_scale = scale

    # ---- merge -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, path: str) -> None:
        if self.merged:
            return
        w0 = self.base_layer.weight
        merged = self.effective_weight(sample=False)
        if not torch.isfinite(merged).all():
            raise ValueError(f"diff pruning merge refused: {path} would get non-finite weights (broken diff)")
        changed = (self.delta(sample=False) != 0).flatten()
        n = int(changed.sum())
        if 3 * n < changed.numel():  # few entries: stash only those
            idx = changed.nonzero().squeeze(1)
            self._stash = (idx, w0.view(-1)[idx].clone())
        else:
            self._stash = (None, w0.detach().clone())
        w0.copy_(merged)
        self.merged = True
        self._cache = None

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w0 = self.base_layer.weight
        idx, values = self._stash  # type: ignore[misc]
        if idx is None:
            w0.copy_(values)
        else:
            w0.view(-1)[idx] = values
        self._stash = None
        self.merged = False
        self._cache = None

    def extra_repr(self) -> str:
        return f"shape={tuple(self.diff.shape)}, structured={self.group_logit is not None}, projected={self.mask is not None}"


class DiffPruningMethod(Method):
    config_cls = DiffPruningConfig
    can_merge = True
    shares_prefix = False  # each forward draws its own gates: a row's prefix and the rest would see two models
    config: DiffPruningConfig

    def __init__(self, config: DiffPruningConfig):
        super().__init__(config)
        self.steps = 0  # optimiser steps done: the run's start step (prepare) plus those seen by after_step
        self._resume_checked = False  # the first after_step recovers a projected mask from α (a resumed run)
        self.project_at: int | None = None  # step after which the diff is projected (from prepare's RunPlan)

    @staticmethod
    def layers(model: nn.Module) -> dict[str, DiffLinear]:
        """{module path: DiffLinear}; the HF name of a layer's weight is ``path + '.weight'``."""
        return {name: m for name, m in model.named_modules() if isinstance(m, DiffLinear)}

    def projected(self, model: nn.Module) -> bool:
        layers = self.layers(model)
        return bool(layers) and all(layer.mask is not None for layer in layers.values())

    # ---- apply / remove --------------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        if self.layers(model):
            raise ValueError("diff pruning is already applied to this model; call remove() first")
        targets = find_linears(model, cfg.targets, "DiffPruningConfig.targets")
        model.requires_grad_(False)
        for path, layer in targets.items():
            replace_module(model, path, DiffLinear(layer, cfg.alpha_init, cfg.structured, cfg.l0_weight))
        self.enabled, self.steps, self.project_at, self._resume_checked = True, 0, None, False

    def remove(self, model: nn.Module) -> None:
        for path, layer in self.layers(model).items():
            layer.unmerge()
            replace_module(model, path, layer.base_layer)
        model.requires_grad_(False)
        self.enabled = True

    # ---- training --------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, batches, loss_fn, plan: RunPlan | None = None) -> None:
        """Read the run plan: where to project, and α's learning-rate scale c = alpha_lr / lr. Uses no batches."""
        if plan is None:
            return
        cfg = self.config
        if cfg.fixed_mask_steps >= plan.total_steps:
            raise ValueError(
                f"DiffPruningConfig.fixed_mask_steps = {cfg.fixed_mask_steps} is invalid: must be < the run's "
                f"{plan.total_steps} optimiser steps (the diff is projected before the fixed-mask steps)"
            )
        self.project_at = plan.total_steps - cfg.fixed_mask_steps
        self.steps = plan.start_step  # a resumed run projects at the planned step, not later
        for layer in self.layers(model).values():
            layer.rescale_alpha(cfg.alpha_lr / plan.lr)

    def project(self, model: nn.Module) -> None:
        """Project every layer's diff to its top-k entries by |z ⊙ w| (see the module docstring)."""
        for layer in self.layers(model).values():
            if layer.mask is None:
                layer.project(self.config.sparsity)

    def after_step(self, model: nn.Module) -> None:
        """Count the step; project at ``project_at``; afterwards hold the mask; re-arm the L0 penalty."""
        layers = self.layers(model)
        if not self._resume_checked and not self.projected(model) and all(l.looks_projected() for l in layers.values()):
            for layer in layers.values():  # resumed after the projection: recover the mask from α
                layer.set_mask(layer.alpha() > 0, layer.diff.detach())
        self._resume_checked = True
        self.steps += 1
        if self.projected(model):
            for layer in layers.values():
                layer.hold_mask()
        elif self.project_at is not None and self.steps >= self.project_at:
            self.project(model)
        for layer in layers.values():
            layer.l0_pending = [True, True]

    def expected_l0(self, model: nn.Module) -> float:
        """L0(α) = Σ over layers of the expected number of non-zero gates (the penalty is λ times this)."""
        with torch.no_grad():
            return float(sum(layer.expected_l0() for layer in self.layers(model).values()))

    def expected_trainable(self, model: nn.Module) -> int:
        """Before the projection: 2·Σ_t n_t (w and α over the targeted weights of n_t = in·out entries) + T with
        ``structured`` (one α_g per tensor); after it: Σ_t k_t, k_t = max(1, ⌊sparsity·n_t + ½⌋)."""
        layers = self.layers(model)
        sizes = [math.prod(layer.base_layer.weight.shape) for layer in layers.values()]
        if self.projected(model):
            return sum(keep_count(n, self.config.sparsity) for n in sizes)
        return 2 * sum(sizes) + (len(sizes) if self.config.structured else 0)

    def parameter_counts(self, model: nn.Module) -> tuple[int, int]:
        """(entries that train now, every parameter entry of the adapted model)."""
        total = sum(p.numel() for p in model.parameters())
        layers = self.layers(model)
        if layers and all(layer.mask is not None for layer in layers.values()):
            return sum(int(layer.mask.sum()) for layer in layers.values()), total  # type: ignore[union-attr]
        return sum(p.numel() for p in self.trainable_parameters(model).values()), total

    # ---- on / off, merge -------------------------------------------------------------------------------------

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Off: every layer computes with θ₀ only (a merged model is unmerged first)."""
        for layer in self.layers(model).values():
            if not enabled:
                layer.unmerge()
            layer.enabled = enabled
        self.enabled = enabled

    def merge(self, model: nn.Module) -> None:
        """θ₀ ← θ₀ + z ⊙ w in every layer. Raises ValueError, changing nothing, if any result is not finite."""
        layers = self.layers(model)
        with torch.no_grad():
            for path, layer in layers.items():
                if not layer.merged and not torch.isfinite(layer.effective_weight(sample=False)).all():
                    raise ValueError(f"diff pruning merge refused: {path} would get non-finite weights (broken diff)")
        for path, layer in layers.items():
            layer.merge(path)

    def unmerge(self, model: nn.Module) -> None:
        """θ₀ back, bit for bit (the overwritten values were stashed)."""
        for layer in self.layers(model).values():
            layer.unmerge()

    def bake(self, model: nn.Module) -> None:
        """Merge, then put the plain base layers back: an ordinary HF model with θ₀ + δ as its weights."""
        self.set_enabled(model, True)
        self.merge(model)
        for path, layer in self.layers(model).items():
            replace_module(model, path, layer.base_layer)
        model.requires_grad_(False)

    # ---- saving ----------------------------------------------------------------------------------------------

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for path, layer in self.layers(model).items():
                delta = layer.delta(sample=False).flatten()
                keep = layer.mask.flatten() if layer.mask is not None else delta != 0
                idx = keep.nonzero().squeeze(1).to(torch.int64)  # ascending
                out[f"{path}.weight{INDICES}"] = idx
                out[f"{path}.weight{VALUES}"] = delta[idx].detach()
        return out

    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        layers = self.layers(model)
        if not layers:
            raise ValueError("diff pruning delta: apply the method to the model before loading")
        expected = {f"{path}.weight{s}" for path in layers for s in (INDICES, VALUES)}
        missing, stray = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or stray:
            what = [f"missing keys {missing[:3]}"] if missing else []
            what += [f"unexpected keys {stray[:3]}"] if stray else []
            raise ValueError(f"diff pruning delta does not match this model: {'; '.join(what)}")
        staged = {}
        for path, layer in layers.items():
            idx, values = tensors[f"{path}.weight{INDICES}"], tensors[f"{path}.weight{VALUES}"]
            numel = layer.diff.numel()
            if idx.dtype != torch.int64 or idx.ndim != 1 or values.shape != idx.shape:
                raise ValueError(f"diff pruning delta: {path}.weight needs 1-D int64 indices and values of the same length")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"diff pruning delta: {path}.weight has indices outside [0, {numel})")
            if not torch.isfinite(values).all():
                raise ValueError(f"diff pruning delta: {path}.weight has non-finite values")
            staged[path] = (idx, values)
        with torch.no_grad():
            for path, layer in layers.items():
                idx, values = staged[path]
                mask = torch.zeros(layer.diff.numel(), dtype=torch.bool, device=layer.diff.device)
                mask[idx.to(mask.device)] = True
                diff = torch.zeros(layer.diff.numel(), dtype=torch.float32, device=layer.diff.device)
                diff[idx.to(diff.device)] = values.to(diff.device, torch.float32)
                layer.set_mask(mask.view(layer.diff.shape), diff.view(layer.diff.shape))

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        kept = sum(int(t.numel()) for k, t in self.adapter_tensors(model).items() if k.endswith(INDICES))
        targeted = sum(layer.diff.numel() for layer in self.layers(model).values())
        return {
            "method": self.name,
            "format": "sparse delta: '<param>.indices' int64 flat positions, '<param>.values' float32 θ − θ₀",
            "projected": self.projected(model),
            "kept": kept,
            "targeted": targeted,
            **self.config.to_dict(),
        }


__all__ = ["DiffPruningConfig", "DiffPruningMethod", "DiffLinear", "hard_concrete", "keep_count"]


register(MethodSpec(
    name="diff_pruning", label="Diff pruning (sparse L0 diff)", family="selective", lr=1e-4,
    prepares=True, goals=("smallest",),
    blurb="θ = θ₀ + z ⊙ w with hard-concrete gates z under an L0 penalty, projected to the top sparsity·n |z ⊙ w|.",
    label_zh="Diff Pruning（稀疏 L0 差分）",
    blurb_zh="选择性微调：θ = θ₀ + z ⊙ w，门控 z 服从 hard-concrete 分布并受 L0 惩罚，最后只保留 |z ⊙ w| 最大的 sparsity·n 个元素。",
    config_cls=DiffPruningConfig, method_cls=DiffPruningMethod,
))
