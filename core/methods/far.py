"""FAR, Freeze And Reconfigure: train a few primed FFN hidden units, with backward work only for them.

Vucetic, Tayaranian, Ziaeefard, Clark, Meyer & Gross 2022, "Efficient Fine-Tuning of BERT Models on the Edge".

A *unit* (node) j of an FFN with hidden width h and model width d is every weight that touches hidden unit j:

    SwiGLU (Llama, Qwen2)   row j of gate_proj.weight (h, d) and of up_proj.weight (h, d), column j of
                            down_proj.weight (d, h); bias entry j of gate/up when the MLP has biases
    GPT-2                   column j of c_fc.weight (d, h) (Conv1D stores (in, out)), c_fc.bias[j],
                            row j of c_proj.weight (h, d)

Life cycle (``prepare`` runs once before the loop's optimiser is built):

1. Priming. Every FFN unit tensor trains with its own AdamW (lr = plan.lr, weight decay = plan.weight_decay) for
   n = ⌈priming_fraction · plan.total_steps⌉ steps, one training batch per step, cycling the batches it is given.
   These steps come *in addition to* the run's steps; everything outside the FFNs stays frozen.
2. Selection. Unit j of a layer scores s_j = Σ |θ_j − θ₀_j|₁ over its entries; the top k = max(1, ⌊retention · h⌋)
   units of *each* FFN (ties: lower index first) are the learners. They keep their primed values.
3. Freeze. Every other unit is written back to θ₀ exactly and frozen.
4. Reconfigure. Permuting hidden units is an exact symmetry of the FFN, so each linear is split once into a
   learner part (the k learner units, trainable) and a frozen part (the h − k others), learners first:

       out side (gate, up, c_fc):  y = [x·W_lᵀ + b_l , x·W_fᵀ + b_f]                      (…, k) ‖ (…, h−k)
       in side (down, c_proj):     y = z[..., :k]·W_lᵀ + z[..., k:]·W_fᵀ + b               (…, d)

   so autograd computes weight gradients only for W_l (k·d entries instead of h·d per linear) while the input
   gradient still flows through both parts. ``merge`` (and ``bake``) write the parts back into the original
   modules in the original order, so inference has no overhead. Split and merged forwards agree up to float
   summation order (the down projection sums its hidden units in two parts).

Without ``prepare`` (``apply`` alone, e.g. core.preflight's meta-device dry run, or a loop that skips priming)
the learners are units 0 .. k−1 of each FFN: the model is already split and trainable, and the trainable count
is the same closed form k · (entries per unit) per layer. ``prepare`` is a no-op once a selection came from
priming or from ``load_adapter_tensors``. A resumed run repeats the priming, which is deterministic for the same
data order, seed and device, so the checkpoint's learner tensors land on the same units.

Non-learner entries are separate frozen tensors that no optimiser sees, so they stay bit-identical to θ₀ even
under weight decay; ``set_enabled(False)`` merges with θ₀ at the learner units too and computes exactly the base
model. Saved (our own format) in adapter_model.safetensors, per FFN at module path P (e.g. ``model.layers.0.mlp``):

    P.learners                 int64 [k]   original hidden indices of the learner units, ascending
    P.<linear>.weight.units    the trained learner slice of that weight in its HF orientation, units in the
                               order of P.learners: gate/up (k, d), down (d, k), c_fc (d, k), c_proj (k, d)
    P.<linear>.bias.units      [k]         the learner entries of an out-side bias (GPT-2 c_fc, biased MLPs)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import cycle, islice
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import find_blocks
from ..config import MethodConfig, knob
from ..linear import linear
from .base import Method, RunPlan, check_tensors, snapshot
from .registry import MethodSpec, register

LEARNERS, UNITS = "learners", "units"

#: (linear attribute, side) of each FFN layout FAR knows; "out" linears produce the hidden units, "in" consume them
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "swiglu": (("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in")),
    "gpt2": (("c_fc", "out"), ("c_proj", "in")),
}


@dataclass
class FarConfig(MethodConfig):
    method: ClassVar[str] = "far"
    retention: float = knob(0.1, "Fraction of each FFN's hidden units that train (the learners).", gt=0.0, max=1.0,
                            help_zh="每个 FFN 中参与训练的隐藏单元比例（学习者）。")
    priming_fraction: float = knob(
        0.1, "Priming steps of the whole FFNs, as a fraction of the run's steps (added before the run).", gt=0.0,
        max=1.0,
        help_zh="预热整个 FFN 的步数，占本次训练步数的比例（加在训练之前）。",
    )


def learner_count(hidden: int, retention: float) -> int:
    """k = max(1, ⌊retention · h⌋) learner units per FFN of hidden width h."""
    return max(1, min(hidden, int(retention * hidden)))


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D: weight (in, out), y = x·W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _hidden_axis(module: nn.Module, side: str) -> int:
    """The axis of ``module.weight`` that indexes hidden units."""
    out_axis = 1 if _is_conv1d(module) else 0
    return out_axis if side == "out" else 1 - out_axis


class SplitLinear(nn.Module):
    """One FFN linear split along its hidden axis into learner units (trainable) and frozen units, learners first.

    Weights keep the orientation of the module they came from (nn.Linear (out, in), Conv1D (in, out)).
    side "out": y = [lin(x; W_l, b_l) , lin(x; W_f, b_f)]               hidden outputs (…, k + (h−k))
    side "in":  y = lin(x[..., :k]; W_l) + lin(x[..., k:]; W_f) + b     x holds the hidden units, learners first
    """

    def __init__(self, side: str, conv1d: bool, k: int, learn_weight: Tensor, frozen_weight: Tensor,
                 learn_bias: Tensor | None, frozen_bias: Tensor | None, bias: Tensor | None):
        super().__init__()
        self.side, self.conv1d, self.k = side, conv1d, k
        self.learn_weight = nn.Parameter(learn_weight)
        self.frozen_weight = nn.Parameter(frozen_weight, requires_grad=False)
        self.learn_bias = None if learn_bias is None else nn.Parameter(learn_bias)
        self.frozen_bias = None if frozen_bias is None else nn.Parameter(frozen_bias, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # in side: not a unit's

    def _lin(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return linear(x, w.t() if self.conv1d else w, b)  # core.linear: through oneDNN in fp32 on AVX-512

    def forward(self, x: Tensor) -> Tensor:
        if self.side == "out":
            return torch.cat([self._lin(x, self.learn_weight, self.learn_bias),
                              self._lin(x, self.frozen_weight, self.frozen_bias)], dim=-1)
        learn = self._lin(x[..., : self.k], self.learn_weight, self.bias)
        return learn + self._lin(x[..., self.k :], self.frozen_weight, None)

    def extra_repr(self) -> str:
        return f"side={self.side}, conv1d={self.conv1d}, learners={self.k}"


@dataclass
class _Ffn:
    """One FFN: its module path, its linears (attribute, side, original module, split module) and its learners."""

    path: str
    mlp: nn.Module
    hidden: int
    linears: list[tuple[str, str, nn.Module]]
    #: (k,) int64 on the CPU, ascending original hidden indices
    learners: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64, device="cpu"))
    splits: dict[str, SplitLinear] = field(default_factory=dict)
    theta0: dict[str, Tensor] = field(default_factory=dict)  # "<attr>.weight"/"<attr>.bias" -> θ₀ learner slice

    def others(self) -> Tensor:
        return _complement(self.learners, self.hidden)

    def unit_tensors(self) -> list[tuple[str, nn.Module, str, int]]:
        """(key, original module, parameter name, hidden axis) of every tensor that holds unit entries."""
        out = []
        for attr, side, module in self.linears:
            out.append((f"{attr}.weight", module, "weight", _hidden_axis(module, side)))
            if side == "out" and module.bias is not None:
                out.append((f"{attr}.bias", module, "bias", 0))
        return out


def find_ffns(model: nn.Module) -> list[_Ffn]:
    """Every block's FFN, checked to be a layout FAR knows (SwiGLU gate/up/down as nn.Linear, GPT-2 Conv1D)."""
    path, blocks = find_blocks(model)
    ffns = []
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        layout = None
        for name, linears in LAYOUTS.items():
            mods = [getattr(mlp, a, None) for a, _ in linears] if mlp is not None else [None]
            if all(isinstance(m, nn.Linear) or (m is not None and _is_conv1d(m)) for m in mods):
                layout = (name, linears, mods)
                break
        if layout is None:
            raise ValueError(
                f"FarConfig: block {i} of {type(model).__name__} has no FFN that FAR knows (an 'mlp' with "
                f"gate_proj/up_proj/down_proj or GPT-2's c_fc/c_proj)"
            )
        _, linears, mods = layout
        first_side = linears[0][1]
        hidden = mods[0].weight.shape[_hidden_axis(mods[0], first_side)]
        for (attr, side), m in zip(linears, mods):
            if m.weight.shape[_hidden_axis(m, side)] != hidden:
                raise ValueError(f"FarConfig: {path}.{i}.mlp.{attr} does not match the hidden width {hidden}")
        ffns.append(_Ffn(f"{path}.{i}.mlp", mlp, hidden, [(a, s, m) for (a, s), m in zip(linears, mods)]))
    return ffns


def _complement(learners: Tensor, hidden: int) -> Tensor:
    """The ascending hidden indices not in ``learners`` (CPU int64, also under a meta default device)."""
    keep = torch.ones(hidden, dtype=torch.bool, device="cpu")
    keep[learners] = False
    return keep.nonzero().squeeze(1)


def _released(t: Tensor) -> Tensor:
    return torch.empty(0, dtype=t.dtype, device=t.device)


class FarMethod(Method):
    config_cls = FarConfig
    can_merge = True

    def __init__(self, config: FarConfig):
        super().__init__(config)
        self._ffns: list[_Ffn] | None = None
        self._split = False  # True: SplitLinear modules in the model; False: the original modules (merged)
        self._stash: dict[tuple[int, str], Tensor] | None = None  # trained learner slices while disabled
        self._resplit = False  # re-enable returns to the split layout
        self.selected_by = ""  # "first units" (apply), "priming" (prepare) or "loaded"
        self.priming_steps_done = 0

    # ---- layout ---------------------------------------------------------------------------------------------

    def _require(self) -> list[_Ffn]:
        if self._ffns is None:
            raise RuntimeError(f"{self.name}: apply(model) has not been called (or the method was removed/baked)")
        return self._ffns

    def _split_ffn(self, f: _Ffn) -> None:
        """Original modules -> SplitLinear (learners first). Reuses the SplitLinear parameters if they exist, so
        an optimiser holding them keeps working across merge/unmerge."""
        k, learners, others = len(f.learners), f.learners, f.others()
        for attr, side, module in f.linears:
            w, b = module.weight, module.bias
            axis = _hidden_axis(module, side)
            parts = dict(
                learn_weight=w.detach().index_select(axis, learners.to(w.device)),
                frozen_weight=w.detach().index_select(axis, others.to(w.device)),
                learn_bias=None, frozen_bias=None, bias=None,
            )
            if b is not None and side == "out":
                parts["learn_bias"] = b.detach().index_select(0, learners.to(b.device))
                parts["frozen_bias"] = b.detach().index_select(0, others.to(b.device))
            elif b is not None:
                parts["bias"] = b.detach()
            split = f.splits.get(attr)
            if split is None:
                split = f.splits[attr] = SplitLinear(side, _is_conv1d(module), k, **parts)
            else:
                split.k = k
                for name, value in parts.items():
                    p = getattr(split, name)
                    if p is not None:
                        p.data = value.to(p.dtype)
            for p in module.parameters(recurse=False):
                p.data = _released(p)
            setattr(f.mlp, attr, split)

    def _merge_ffn(self, f: _Ffn) -> None:
        """SplitLinear -> original modules, every unit back at its original hidden index."""
        learners, others = f.learners, f.others()
        for attr, side, module in f.linears:
            split = f.splits[attr]
            axis = _hidden_axis(module, side)
            dtype, device = split.frozen_weight.dtype, split.frozen_weight.device
            shape = list(split.frozen_weight.shape)
            shape[axis] = f.hidden
            w = torch.empty(shape, dtype=dtype, device=device)
            w.index_copy_(axis, learners.to(device), split.learn_weight.detach().to(dtype))
            w.index_copy_(axis, others.to(device), split.frozen_weight.detach())
            module.weight.data = w
            if split.learn_bias is not None:
                b = torch.empty(f.hidden, dtype=split.frozen_bias.dtype, device=device)
                b.index_copy_(0, learners.to(device), split.learn_bias.detach().to(b.dtype))
                b.index_copy_(0, others.to(device), split.frozen_bias.detach())
                module.bias.data = b
            elif split.bias is not None:
                module.bias.data = split.bias.detach()
            for p in split.parameters():
                p.data = _released(p)
            setattr(f.mlp, attr, module)

    def _set_layout(self, split: bool) -> None:
        if split == self._split:
            return
        for f in self._require():
            self._split_ffn(f) if split else self._merge_ffn(f)
        self._split = split

    def _select(self, f: _Ffn, learners: Tensor) -> None:
        """Make ``learners`` the learner units of ``f`` (merged layout) and remember their θ₀ slices."""
        f.learners = learners.to("cpu", torch.int64)
        f.theta0 = {
            key: snapshot(getattr(m, pname).index_select(axis, f.learners.to(getattr(m, pname).device)))
            for key, m, pname, axis in f.unit_tensors()
        }

    # ---- required -------------------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> None:
        """Freeze the model and split every FFN with units 0 .. k−1 as learners (no data needed: meta works)."""
        ffns = find_ffns(model)
        model.requires_grad_(False)
        self._ffns, self._split, self._stash, self.enabled = ffns, False, None, True
        for f in ffns:
            self._select(f, torch.arange(learner_count(f.hidden, self.config.retention), device="cpu"))
        self.selected_by = "first units"
        self._set_layout(True)

    def remove(self, model: nn.Module) -> None:
        ffns = self._require()
        self.set_enabled(model, False)  # merged layout with θ₀ everywhere: the base model, bit for bit
        model.requires_grad_(False)
        self._ffns, self._split, self._stash, self._resplit, self.enabled = None, False, None, False, True

    def expected_trainable(self, model: nn.Module) -> int:
        """Σ over FFNs of k · (entries per unit), k = max(1, ⌊retention · h⌋). Entries per unit: d_in of every out
        side linear (+1 with a bias) and d_out of every in side linear: 3·d for SwiGLU, 2·d + 1 for GPT-2."""
        total = 0
        for f in self._require():
            per_unit = 0
            for _, side, module in f.linears:
                nf, nx = (module.nf, module.nx) if _is_conv1d(module) else (module.out_features, module.in_features)
                per_unit += nx + (module.bias is not None) if side == "out" else nf
            total += learner_count(f.hidden, self.config.retention) * per_unit
        return total

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, f in enumerate(self._require()):
            out[f"{f.path}.{LEARNERS}"] = f.learners.clone()
            for key, m, pname, axis in f.unit_tensors():
                if self._stash is not None:
                    value = self._stash[(i, key)]
                elif self._split:
                    attr, part = key.split(".")
                    value = getattr(f.splits[attr], f"learn_{part}")
                else:
                    p = getattr(m, pname)
                    value = p.index_select(axis, f.learners.to(p.device))
                out[f"{f.path}.{key}.{UNITS}"] = value.detach()
        return out

    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        """Read a saved selection and its learner values into a freshly applied (untrained) model."""
        ffns = self._require()
        expected: dict[str, tuple[int, ...]] = {}
        for f in ffns:
            k = learner_count(f.hidden, self.config.retention)
            expected[f"{f.path}.{LEARNERS}"] = (k,)
            for key, m, pname, axis in f.unit_tensors():
                shape = list(f.theta0[key].shape)
                shape[axis] = k
                expected[f"{f.path}.{key}.{UNITS}"] = tuple(shape)
        check_tensors(expected, tensors, "FAR units")
        for f in ffns:
            idx = tensors[f"{f.path}.{LEARNERS}"]
            if idx.dtype != torch.int64 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= f.hidden)):
                raise ValueError(f"FAR units: {f.path}.{LEARNERS} must be int64 indices in [0, {f.hidden})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"FAR units: {f.path}.{LEARNERS} must be strictly ascending")
        self.set_enabled(model, True)
        self._set_layout(False)
        with torch.no_grad():
            for f in ffns:  # back to θ₀ at the old learners, then the saved learners and their values
                for key, m, pname, axis in f.unit_tensors():
                    p = getattr(m, pname)
                    p.index_copy_(axis, f.learners.to(p.device), f.theta0[key].to(p.device, p.dtype))
                self._select(f, tensors[f"{f.path}.{LEARNERS}"])
                for key, m, pname, axis in f.unit_tensors():
                    p = getattr(m, pname)
                    value = tensors[f"{f.path}.{key}.{UNITS}"].to(p.device, p.dtype)
                    p.index_copy_(axis, f.learners.to(p.device), value)
        self.selected_by = "loaded"
        self._set_layout(True)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        ffns = self._require()
        return {
            "method": self.name,
            "format": "per FFN P: 'P.learners' int64 hidden indices; 'P.<linear>.weight.units' / '.bias.units' "
                      "the trained learner slices in HF orientation",
            "ffns": len(ffns),
            "learners_per_ffn": [len(f.learners) for f in ffns],
            "selected_by": self.selected_by,
            "priming_steps": self.priming_steps_done,
            **self.config.to_dict(),
        }

    # ---- prepare: priming and selection ---------------------------------------------------------------------

    def priming_steps(self, plan: RunPlan) -> int:
        """n = ⌈priming_fraction · total_steps⌉ (at least 1)."""
        return max(1, math.ceil(self.config.priming_fraction * plan.total_steps))

    def prepare(self, model: nn.Module, batches, loss_fn, plan: RunPlan) -> None:
        """Prime every FFN unit for ``priming_steps(plan)`` AdamW steps, keep each FFN's top-k units by L1 weight
        change, reset the rest to θ₀ and split again. No-op once primed or loaded."""
        ffns = self._require()
        if self.selected_by in ("priming", "loaded"):
            return
        self.set_enabled(model, True)
        self._set_layout(False)  # original modules, units 0..k-1 untouched so far
        tensors = [(f, key, getattr(m, pname), axis) for f in ffns for key, m, pname, axis in f.unit_tensors()]
        theta0 = {(id(f), key): p.detach().clone() for f, key, p, _ in tensors}
        n = self.priming_steps(plan)
        model.requires_grad_(False)
        for _, _, p, _ in tensors:
            p.requires_grad_(True)
        opt = torch.optim.AdamW([p for _, _, p, _ in tensors], lr=plan.lr, weight_decay=plan.weight_decay)
        done = 0
        try:
            cached: list = []
            for batch in islice(batches, n):
                cached.append(batch)
            if not cached:
                raise ValueError("FAR.prepare: got no training batches to prime the FFNs with")
            for batch in islice(cycle(cached), n):
                loss = loss_fn(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
        finally:
            opt.zero_grad(set_to_none=True)
            del opt
            model.requires_grad_(False)
        self.priming_steps_done = done

        with torch.no_grad():
            for f in ffns:
                score = torch.zeros(f.hidden, dtype=torch.float32, device=tensors[0][2].device)
                for g, key, p, axis in tensors:
                    if g is f:
                        change = (p.detach().float() - theta0[(id(f), key)].float()).abs()
                        score += change.sum(dim=1 - axis) if change.ndim == 2 else change
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(score)  # every DDP rank must pick the same units
                k = learner_count(f.hidden, self.config.retention)
                order = torch.sort(score.cpu(), descending=True, stable=True).indices
                learners = order[:k].sort().values
                others = _complement(learners, f.hidden)
                for g, key, p, axis in tensors:  # non-learners back to θ₀, exactly
                    if g is f:
                        idx = others.to(p.device)
                        p.index_copy_(axis, idx, theta0[(id(f), key)].index_select(axis, idx))
                f.learners = learners
                f.theta0 = {key: snapshot(theta0[(id(f), key)].index_select(axis, learners.to(p.device)))
                            for g, key, p, axis in tensors if g is f}
        del theta0
        self.selected_by = "priming"
        self._set_layout(True)

    # ---- enable / merge -------------------------------------------------------------------------------------

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Disabled: merged layout with θ₀ at the learner units, i.e. exactly the base model."""
        ffns = self._require()
        if enabled == self.enabled:
            return
        with torch.no_grad():
            if not enabled:
                self._resplit = self._split
                self._set_layout(False)
                self._stash = {}
                for i, f in enumerate(ffns):
                    for key, m, pname, axis in f.unit_tensors():
                        p = getattr(m, pname)
                        idx = f.learners.to(p.device)
                        self._stash[(i, key)] = p.index_select(axis, idx)
                        p.index_copy_(axis, idx, f.theta0[key].to(p.device, p.dtype))
            else:
                for i, f in enumerate(ffns):
                    for key, m, pname, axis in f.unit_tensors():
                        p = getattr(m, pname)
                        p.index_copy_(axis, f.learners.to(p.device), self._stash[(i, key)])  # type: ignore[index]
                self._stash = None
                self.enabled = True
                self._set_layout(self._resplit)
        self.enabled = enabled

    def merge(self, model: nn.Module) -> None:
        """Write the learner and frozen parts back into the original modules (original unit order)."""
        self._require()
        if not self.enabled:
            raise RuntimeError("FAR: enable the method (set_enabled(model, True)) before merging")
        self._set_layout(False)

    def unmerge(self, model: nn.Module) -> None:
        """Split the FFNs again (same learners, same trainable Parameter objects)."""
        self._require()
        if not self.enabled:
            raise RuntimeError("FAR: enable the method (set_enabled(model, True)) before unmerging")
        self._set_layout(True)

    def bake(self, model: nn.Module) -> None:
        self._require()
        self.set_enabled(model, True)
        self._set_layout(False)
        model.requires_grad_(False)
        self._ffns, self._stash = None, None


__all__ = ["FarConfig", "FarMethod", "SplitLinear", "find_ffns", "learner_count"]


register(MethodSpec(
    name="far", label="FAR (Freeze And Reconfigure FFN units)", family="selective", lr=5e-4,
    trains_base=True, prepares=True, goals=("quick",),
    blurb="Prime the FFNs briefly, then train only the top retention of FFN units by weight change; the rest is "
          "reset, frozen and split off so backward skips their weight gradients. Merges back: no inference cost.",
    label_zh="FAR（冻结并重构 FFN 单元）",
    blurb_zh="选择性微调：先短暂预热整个 FFN，再按权重变化只训练比例为 retention 的 FFN 单元；其余单元重置、冻结并拆分出去，反向传播跳过它们的权重梯度。可合并回模型，推理无额外开销。",
    config_cls=FarConfig, method_cls=FarMethod,
))
