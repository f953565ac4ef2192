"""LoRA: a trainable low-rank update beside a frozen linear layer (Hu et al. 2021, arXiv:2106.09685).

For a frozen layer with weight W0 (out, in) and bias b, the adapted layer computes, on x of shape (..., in):

    y = W0·x + b + s · B·A·dropout(x)        A: (r, in)   B: (out, r)
    s = alpha / r                             (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r))

A starts kaiming-uniform (a = sqrt 5, as nn.Linear) and B at zero, so the adapted model starts equal to the
base. Only A and B train. Merging folds s·B·A into W0; GPT-2's ``Conv1D`` stores its weight as (in, out), so
there the update is transposed before it is added ("fan_in_fan_out").

Targets name the last component of a module path exactly (``q_proj`` matches ``model.layers.3.self_attn.q_proj``),
or ``all-linear``: every nn.Linear / Conv1D inside the transformer blocks. The LM head is never adapted.

Saved format: PEFT's ``LORA``. adapter_model.safetensors holds, for every adapted module,

    base_model.model.<module path>.lora_A.weight    (r, in)
    base_model.model.<module path>.lora_B.weight    (out, r)

and adapter_config.json is PEFT's LoraConfig, so ``peft.PeftModel.from_pretrained(base, folder)`` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..blocks import find_blocks
from ..config import MethodConfig, knob
from .registry import MethodSpec, register
from .base import Method, check_tensors, copy_into

LINEAR_TYPES = (nn.Linear, Conv1D)
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the HF model)


# ---- helpers shared with other module-level methods (BitFit imports these) ---------------------------------


@dataclass
class LoraConfig(MethodConfig):
    method: ClassVar[str] = "lora"
    r: int = knob(8, "Rank of the update B·A.", min=1, help_zh="更新矩阵 B·A 的秩。")
    alpha: float = knob(16.0, "Scale: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA).", gt=0.0,
                        help_zh="缩放：更新乘以 alpha/r（rsLoRA 时为 alpha/sqrt(r)）。")
    dropout: float = knob(0.0, "Dropout on the LoRA input.", min=0.0, max=0.9, help_zh="LoRA 输入上的 dropout。")
    targets: list[str] = knob(["q_proj", "v_proj"], "Module names to adapt, or 'all-linear'.",
                              help_zh="要适配的模块名称，或 'all-linear'。")
    rslora: bool = knob(False, "Rank-stabilised scaling alpha/sqrt(r).", help_zh="秩稳定缩放 alpha/sqrt(r)（rsLoRA）。")



def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear (weight (out, in)) or a GPT-2 Conv1D (weight (in, out))."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def find_linears(model: nn.Module, targets: list[str], field: str) -> dict[str, nn.Module]:
    """{module path: layer} for the nn.Linear / Conv1D layers inside the transformer blocks named by ``targets``.

    A target matches the last component of the path exactly; ``all-linear`` selects all of them. ``field`` is the
    config field named in the ValueError raised for an empty or unknown target."""
    blocks_path, _ = find_blocks(model)
    layers = {
        name: m
        for name, m in model.named_modules()
        if name.startswith(blocks_path + ".") and isinstance(m, LINEAR_TYPES)
    }
    available = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in layers))
    allowed = f"available: {', '.join(available)}, or 'all-linear'"
    if not targets:
        raise ValueError(f"{field}: no target given; {allowed}")
    if "all-linear" in targets:
        return layers
    for t in targets:
        if t not in available:
            raise ValueError(f"{field}: no module named {t!r}; {allowed}")
    return {name: m for name, m in layers.items() if name.rsplit(".", 1)[-1] in targets}


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``path`` of ``model``."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# ---- the layer ----------------------------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """Wraps a frozen nn.Linear or Conv1D ``base_layer``: y = base_layer(x) + s·B(A(dropout(x))).

    A and B are kept in float32 even when the base is half precision; x is cast to their dtype and the update
    back to the base output's dtype. ``merged`` means s·B·A currently lives inside base_layer.weight."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True
        self.merged = False
        self.train(base_layer.training)

    def delta_weight(self) -> Tensor:
        """s·B·A in the layout of base_layer.weight: (out, in) for nn.Linear, (in, out) for Conv1D."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out)
        if not self.enabled or self.merged:
            return y
        # under autocast the linears cast x themselves (to the same values): no fp32 copy of x to cast back; dropout
        # still draws and scales in fp32, as without autocast
        cast = not torch.is_autocast_enabled(x.device.type) or not isinstance(self.dropout, nn.Identity)
        h = self.dropout(x.to(self.lora_A.weight.dtype) if cast else x)
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self, path: str = "") -> None:
        if self.merged:
            return
        w = self.base_layer.weight
        merged = w + self.delta_weight().to(w.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"LoRA merge refused: {path or 'a layer'} would get non-finite weights (broken adapter)")
        w.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


# ---- the method ---------------------------------------------------------------------------------------------


class LoraMethod(Method):
    config_cls = LoraConfig
    peft_type = "LORA"
    can_merge = True
    config: LoraConfig

    @staticmethod
    def layers(model: nn.Module) -> dict[str, LoraLinear]:
        """{module path: LoraLinear} of the adapted layers."""
        return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}

    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        if self.layers(model):
            raise ValueError("LoRA is already applied to this model; call remove() first")
        targets = find_linears(model, cfg.targets, "LoraConfig.targets")
        for path, layer in targets.items():  # check every layer before touching any
            fan_in, fan_out = linear_shape(layer)
            if cfg.r > min(fan_in, fan_out):
                raise ValueError(
                    f"LoraConfig.r = {cfg.r} is invalid: must be <= min(in, out) = {min(fan_in, fan_out)} "
                    f"for {path} ({fan_in} -> {fan_out})"
                )
        model.requires_grad_(False)
        for path, layer in targets.items():
            replace_module(model, path, LoraLinear(layer, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora))
        self.enabled = True

    def expected_trainable(self, model: nn.Module) -> int:
        """N = Σ r·(in + out) over the targeted layers (A (r, in), B (out, r)). The layers are found as before
        apply: a wrapped layer stands for its base layer, and nothing inside a wrapper is a target itself."""
        cfg = self.config
        blocks_path, _ = find_blocks(model)
        wrapped = tuple(f"{path}." for path in self.layers(model))
        shapes = []
        for name, m in model.named_modules():
            if not name.startswith(blocks_path + ".") or name.startswith(wrapped):
                continue
            if "all-linear" in cfg.targets or name.rsplit(".", 1)[-1] in cfg.targets:
                if isinstance(m, LoraLinear):
                    shapes.append(linear_shape(m.base_layer))
                elif isinstance(m, LINEAR_TYPES):
                    shapes.append(linear_shape(m))
        return sum(cfg.r * (fan_in + fan_out) for fan_in, fan_out in shapes)

    def remove(self, model: nn.Module) -> None:
        for path, layer in self.layers(model).items():
            layer.unmerge()
            replace_module(model, path, layer.base_layer)

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for path, layer in self.layers(model).items():
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight  # (r, in)
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight  # (out, r)
        return out

    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        params = self.adapter_tensors(model)
        check_tensors({k: tuple(p.shape) for k, p in params.items()}, tensors, "LoRA adapter")
        for k, p in params.items():
            copy_into(p, tensors[k])

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.config
        layers = self.layers(model)
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": cfg.r,
            "lora_alpha": alpha,
            "lora_dropout": cfg.dropout,
            # the leaf names actually adapted; PEFT matches them the same way (exact last component)
            "target_modules": sorted({path.rsplit(".", 1)[-1] for path in layers}),
            "use_rslora": cfg.rslora,
            "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
            "bias": "none",
            "init_lora_weights": True,
            "use_dora": False,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Off: every layer computes base_layer(x) only (a merged model is unmerged first)."""
        for layer in self.layers(model).values():
            if not enabled:
                layer.unmerge()
            layer.enabled = enabled
        self.enabled = enabled

    def merge(self, model: nn.Module) -> None:
        """W0 <- W0 + s·B·A in every layer. Raises ValueError, changing nothing, if any result is not finite."""
        layers = self.layers(model)
        for path, layer in layers.items():
            w = layer.base_layer.weight
            if not layer.merged and not torch.isfinite(w + layer.delta_weight().detach().to(w.dtype)).all():
                raise ValueError(f"LoRA merge refused: {path} would get non-finite weights (broken adapter)")
        for path, layer in layers.items():
            layer.merge(path)

    def unmerge(self, model: nn.Module) -> None:
        """W0 <- W0 - s·B·A: the base weights again, up to float rounding."""
        for layer in self.layers(model).values():
            layer.unmerge()

    def bake(self, model: nn.Module) -> None:
        """Merge, then put the plain base layers back: the model is an ordinary HF model with updated weights."""
        self.set_enabled(model, True)
        self.merge(model)
        for path, layer in self.layers(model).items():
            replace_module(model, path, layer.base_layer)
        model.requires_grad_(False)


register(MethodSpec(
    name="lora", label="LoRA", family="reparameterised", lr=2e-4, goals=("quick", "frozen_base", "quality"),
    blurb="Low-rank update B·A beside each frozen weight: y = W₀x + (α/r)·B·A·x. Small, mergeable.",
    label_zh="LoRA（低秩适配）",
    blurb_zh="重参数化微调：在每个冻结权重旁路添加低秩更新 B·A：y = W₀x + (α/r)·B·A·x。体积小，可合并。",
    config_cls=LoraConfig, method_cls=LoraMethod,
))
