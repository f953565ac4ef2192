"""FishMask: train a fixed sparse mask of the parameters with the most Fisher information.

Sung, Nair & Raffel 2021, "Training Neural Networks with Fixed Sparse Masks". Over B = fisher_batches batches
the diagonal of the (empirical) Fisher information is estimated as the mean squared gradient

    F_i = (1/B) · Σ_b (∂ loss_b / ∂θ_i)²            one value per parameter entry θ_i

and the mask keeps the global top k = max(1, ⌊keep_ratio · total⌋) entries over the whole model (tied weights
counted once). Only tensors with at least one kept entry get ``requires_grad``; a gradient hook zeroes every
masked-out entry, and ``after_step`` writes the original value back into every masked-out entry, so those stay
bit-identical even though AdamW's weight decay shrinks every entry of a trained tensor. (That needs one exact
copy of each trained tensor on its own device.)

Life cycle. ``apply`` only freezes the model: the mask is undefined until ``prepare(model, batches, loss_fn)``
estimates it, or ``load_adapter_tensors`` reads it from a saved adapter. Training before that fails with a
RuntimeError that says so (``trainable_parameters`` and ``after_step`` check). ``prepare`` is a no-op once the
mask exists, so a resumed run that loads its saved adapter first keeps its mask exactly. Under DDP the Fisher
estimates of all ranks are averaged (all_reduce) before the top-k, so every rank trains the same entries.

Saved as a sparse delta (our own format) in adapter_model.safetensors, two tensors per trained parameter:

    <hf parameter name>.indices   int64 [n]   flat (row-major) positions of the kept entries, ascending
    <hf parameter name>.values    [n]          the trained values at those positions, in the parameter's dtype

Loading writes the values in place (exact, no float addition). Merging is a no-op: training is in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import MethodConfig, knob
from .registry import MethodSpec, register
from .base import Method, RunPlan

INDICES, VALUES = ".indices", ".values"

NO_MASK = (
    "FishMask has no mask yet: call method.prepare(model, batches, loss_fn) before training (it estimates the "
    "Fisher information on the first fisher_batches batches), or load a saved FishMask adapter"
)


@dataclass
class FishMaskConfig(MethodConfig):
    method: ClassVar[str] = "fishmask"
    keep_ratio: float = knob(0.005, "Fraction of all parameters trained: the top-k by Fisher information.", gt=0.0, max=1.0,
                             help_zh="参与训练的参数占全部参数的比例：按 Fisher 信息取前 k 个。")
    fisher_batches: int = knob(8, "Batches used to estimate the Fisher information (squared gradients).", min=1,
                               help_zh="估计 Fisher 信息（平方梯度）所用的批次数。")



class FishMaskMethod(Method):
    config_cls = FishMaskConfig
    can_merge = True

    def __init__(self, config: FishMaskConfig):
        super().__init__(config)
        self._masks: dict[str, Tensor] | None = None  # name -> bool mask, same shape and device as the param
        self._originals: dict[str, Tensor] = {}  # name -> exact copy of the base tensor (param device)
        self._stash: dict[str, Tensor] | None = None  # name -> trained values at the mask, while disabled
        self._hooks: list[Any] = []
        self.fisher_batches_used = 0

    # ---- mask -----------------------------------------------------------------------------------------------

    @staticmethod
    def keep_count(total: int, keep_ratio: float) -> int:
        """k = max(1, ⌊keep_ratio · total⌋)."""
        return max(1, min(total, int(keep_ratio * total)))

    @property
    def has_mask(self) -> bool:
        return self._masks is not None

    def _require_mask(self) -> dict[str, Tensor]:
        if self._masks is None:
            raise RuntimeError(NO_MASK)
        return self._masks

    def _install(self, model: nn.Module, masks: dict[str, Tensor]) -> None:
        """Record the originals of the masked tensors, make them trainable and hook their gradients."""
        params = dict(model.named_parameters())
        model.requires_grad_(False)
        self._masks = masks
        self._originals = {n: params[n].detach().clone() for n in masks}
        for n, m in masks.items():
            params[n].requires_grad_(True)
            self._hooks.append(params[n].register_hook(lambda g, m=m: torch.where(m, g, torch.zeros_like(g))))

    def _drop(self, model: nn.Module) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        model.requires_grad_(False)
        self._masks, self._originals, self._stash = None, {}, None

    def prepare(self, model: nn.Module, batches, loss_fn, plan: RunPlan | None = None) -> None:
        """Estimate the diagonal Fisher on ``fisher_batches`` batches and fix the global top-k mask."""
        if self._masks is not None:
            return
        cfg: FishMaskConfig = self.config  # type: ignore[assignment]
        params = dict(model.named_parameters())
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        used = 0
        model.requires_grad_(True)  # grads on everything, only for the estimate
        try:
            for batch in batches:
                if used >= cfg.fisher_batches:
                    break
                model.zero_grad(set_to_none=True)
                loss_fn(batch).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach().float().square()
                used += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)
        if used == 0:
            raise ValueError("FishMask.prepare: got no batches to estimate the Fisher information from")
        self.fisher_batches_used = used

        # global top-k over every entry of every tensor
        names = list(fisher)
        device = fisher[names[0]].device
        flat = torch.cat([fisher[n].flatten().to(device) for n in names]) / used  # (total,)
        del fisher
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)  # every DDP rank must pick the same mask: average over ranks' data
            flat /= torch.distributed.get_world_size()
        k = self.keep_count(flat.numel(), cfg.keep_ratio)
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
        keep[torch.topk(flat, k, sorted=False).indices] = True
        masks, start = {}, 0
        for n in names:
            p = params[n]
            m = keep[start : start + p.numel()].view(p.shape).to(p.device)
            start += p.numel()
            if m.any():
                masks[n] = m
        self._install(model, masks)

    # ---- interface ------------------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> None:
        """Freeze the model. The mask stays undefined until prepare() or load_adapter_tensors()."""
        self._drop(model)
        self.enabled = True

    def remove(self, model: nn.Module) -> None:
        if self._masks is not None and self.enabled:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in self._originals.items():
                    params[n].copy_(t)
        self._drop(model)
        self.enabled = True

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        masks = self._require_mask()
        params = dict(model.named_parameters())
        return {n: params[n] for n in masks}

    def parameter_counts(self, model: nn.Module) -> tuple[int, int]:
        """(kept entries, total entries). Before prepare: the k that prepare will keep."""
        total = sum(p.numel() for p in model.parameters())
        if self._masks is None:
            return self.keep_count(total, self.config.keep_ratio), total  # type: ignore[attr-defined]
        return sum(int(m.sum()) for m in self._masks.values()), total

    def memory(self, trainable: int, total: int, base_bytes: int, device: str) -> tuple[int, int]:
        """The global top-k touches nearly every tensor, and a touched tensor trains whole (its gradient and AdamW
        state are dense; the hook masks them): the optimiser holds ~every entry, plus an exact copy of each
        trained tensor and its bool mask (1 byte an entry)."""
        return total, total * (base_bytes + 1)

    def expected_trainable(self, model: nn.Module) -> int:
        """N = k = max(1, ⌊keep_ratio · total⌋), total = Σ numel over the model's tensors (tied ones once): the
        global top-k keeps exactly k entries."""
        total = sum(p.numel() for p in model.parameters())
        return self.keep_count(total, self.config.keep_ratio)  # type: ignore[attr-defined]

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Write the originals back outside the mask (undoes weight decay there, bit for bit)."""
        masks = self._require_mask()
        params = dict(model.named_parameters())
        for n, m in masks.items():
            params[n].copy_(torch.where(m, params[n], self._originals[n]))

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        masks = self._require_mask()
        if enabled == self.enabled:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            if not enabled:
                self._stash = {n: params[n][m] for n, m in masks.items()}
                for n, t in self._originals.items():
                    params[n].copy_(t)
            else:
                for n, m in masks.items():
                    params[n][m] = self._stash[n]  # type: ignore[index]
                self._stash = None
        self.enabled = enabled

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        masks = self._require_mask()
        params = dict(model.named_parameters())
        out = {}
        for n, m in masks.items():
            flat_mask = m.flatten()
            out[n + INDICES] = flat_mask.nonzero().squeeze(1).to(torch.int64)  # ascending
            values = self._stash[n] if self._stash is not None else params[n].detach().flatten()[flat_mask]
            out[n + VALUES] = values.detach()
        return out

    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        if self._masks is not None:
            raise ValueError("FishMask: this model already has a mask; apply the method to a fresh model to load")
        params = dict(model.named_parameters())
        names = sorted({k[: -len(INDICES)] for k in tensors if k.endswith(INDICES)})
        expected = {n + suffix for n in names for suffix in (INDICES, VALUES)}
        stray = sorted(set(tensors) - expected)
        if stray:
            raise ValueError(f"FishMask delta does not match this model: unexpected keys {stray[:3]}")
        masks: dict[str, Tensor] = {}
        for n in names:
            if n not in params:
                raise ValueError(f"FishMask delta does not match this model: {n} is not a parameter")
            idx, values = tensors[n + INDICES], tensors[n + VALUES]
            numel = params[n].numel()
            if idx.dtype != torch.int64 or idx.ndim != 1 or values.shape != idx.shape:
                raise ValueError(f"FishMask delta: {n} needs 1-D int64 indices and values of the same length")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"FishMask delta: {n} has indices outside [0, {numel})")
            m = torch.zeros(numel, dtype=torch.bool, device=params[n].device)
            m[idx.to(m.device)] = True
            masks[n] = m.view(params[n].shape)
        if not masks:
            raise ValueError("FishMask delta is empty")
        self._install(model, masks)
        with torch.no_grad():
            for n in names:
                p = params[n]
                p.view(-1)[tensors[n + INDICES].to(p.device)] = tensors[n + VALUES].to(p.device, p.dtype)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        kept, total = self.parameter_counts(model)
        return {
            "method": self.name,
            "format": "sparse delta: '<param>.indices' int64 flat positions, '<param>.values' trained values",
            "kept": kept,
            "total": total,
            **self.config.to_dict(),
        }

    def merge(self, model: nn.Module) -> None:
        """Nothing to do: the kept entries are trained in place."""

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to do (see merge); use set_enabled(False) for the base output."""

    def bake(self, model: nn.Module) -> None:
        self._require_mask()
        self.set_enabled(model, True)
        self._drop(model)  # hooks, mask and originals go; the trained values stay


__all__ = ["FishMaskMethod"]


register(MethodSpec(
    name="fishmask", label="FishMask (top-k% by Fisher information)", family="selective", lr=1e-4,
    trains_base=True, prepares=True,
    blurb="Train the parameters with the largest squared gradients; every other gradient is masked.",
    label_zh="FishMask（按 Fisher 信息取前 k%）",
    blurb_zh="选择性微调：只训练平方梯度（Fisher 信息）最大的参数，其余梯度全部屏蔽。",
    config_cls=FishMaskConfig, method_cls=FishMaskMethod,
))
