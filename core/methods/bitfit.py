"""BitFit: train the bias terms only (Ben Zaken et al. 2022, arXiv:2106.10199).

Every targeted linear layer y = W·x + b keeps W frozen and trains b (out,). Layers without a bias (the Llama
family has none) get a zero-initialised one, so the model is unchanged at the start and the method trains
something real there too. With ``train_norm_bias`` the biases of LayerNorms (GPT-2 style models) train as well.
The trained biases live inside the layers, so the adapted model already runs at base speed: merge and unmerge
are no-ops, and ``bake`` only makes the model config agree with the biases that now exist.

Saved format: PEFT's ``BEFT`` layout, an additive bias delta per module,

    base_model.model.<module path>.beft_bias    (1, out)     = trained bias - base bias (0 where none existed)

When every trained bias belongs to an nn.Linear (Llama, Qwen2, ...), adapter_config.json is PEFT's BeftConfig
and ``peft.PeftModel.from_pretrained(base, folder)`` loads it (PEFT adds the delta to the layer output). PEFT's
BEFT supports nn.Linear only, so for GPT-2 (Conv1D layers, LayerNorm biases) the same tensors are written with
our own config: {"format": "peft_studio.bitfit", "format_version": 1, "modules": [...], "added_bias": [...]},
and ``peft_type`` of the method instance is None.
"""

from __future__ import annotations

from dataclasses import dataclass
import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import find_blocks
from ..config import MethodConfig, knob
from .adapter import ATTENTION_NAMES, MLP_NAMES
from .registry import MethodSpec, register
from .base import Method, check_tensors, copy_into, snapshot
from .lora import PEFT_PREFIX, find_linears, linear_shape

FORMAT = "peft_studio.bitfit"
#: config switch of a Llama-style model that gives every linear in that part of a block a bias
BIAS_SWITCHES = {"attention_bias": ATTENTION_NAMES, "mlp_bias": MLP_NAMES}


@dataclass
class BitFitConfig(MethodConfig):
    method: ClassVar[str] = "bitfit"
    targets: list[str] = knob(
        ["all-linear"],
        "Linears whose bias is trained ('all-linear' or names like q_proj). Missing biases are added at zero.",
        help_zh="训练哪些线性层的偏置（'all-linear' 或 q_proj 之类的名称）。缺少的偏置会以零补上。",
    )
    train_norm_bias: bool = knob(True, "Also train existing LayerNorm biases (GPT-2 style models).",
                                 help_zh="同时训练已有的 LayerNorm 偏置（GPT-2 类模型）。")



def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


class BitFitMethod(Method):
    config_cls = BitFitConfig
    peft_type = "BEFT"  # per instance: None after apply() when PEFT's BEFT cannot hold the trained biases
    can_merge = True
    config: BitFitConfig

    def __init__(self, config: BitFitConfig):
        super().__init__(config)
        self._forget()

    def _forget(self) -> None:
        """Drop all state: the method is no longer applied to any model."""
        self.paths: list[str] = []  # module paths whose bias trains
        self._added: dict[str, nn.Parameter] = {}  # bias Parameters created by apply (the base had none)
        self._original: dict[str, Tensor] = {}  # CPU copies of the base values of pre-existing biases
        self._trained: dict[str, Tensor] = {}  # CPU copies of trained pre-existing biases while disabled
        self.enabled = True
        self.__dict__.pop("peft_type", None)  # back to the class default

    def expected_trainable(self, model: nn.Module) -> int:
        """N = Σ out over the targeted linears (each trains one bias (out,), added at zero where it had none)
        + Σ numel(bias) over the norms that have a bias, when train_norm_bias."""
        cfg = self.config
        linears = find_linears(model, cfg.targets, "BitFitConfig.targets") if cfg.targets else {}
        n = sum(linear_shape(m)[1] for m in linears.values())
        if cfg.train_norm_bias:
            norms = [m for m in model.modules() if is_norm(m) and isinstance(getattr(m, "bias", None), nn.Parameter)]
            n += sum(m.bias.numel() for m in norms)
        return n

    # ---- apply / remove ----------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> None:
        cfg = self.config
        if self.paths:
            raise ValueError("BitFit is already applied; call remove() first")
        modules = find_linears(model, cfg.targets, "BitFitConfig.targets") if cfg.targets else {}
        if cfg.train_norm_bias:
            for path, m in model.named_modules():
                if is_norm(m) and isinstance(getattr(m, "bias", None), nn.Parameter):
                    modules[path] = m
        if not modules:
            raise ValueError(
                f"BitFitConfig.targets = {cfg.targets!r} with train_norm_bias = {cfg.train_norm_bias}: nothing to "
                f"train on {type(model).__name__}; name linear layers (or 'all-linear') in targets"
            )
        model.requires_grad_(False)
        for path, m in modules.items():
            if m.bias is None:
                w = m.weight
                m.bias = nn.Parameter(torch.zeros(linear_shape(m)[1], device=w.device, dtype=w.dtype))
                self._added[path] = m.bias
            else:
                self._original[path] = snapshot(m.bias)
            m.bias.requires_grad_(True)
        self.paths = list(modules)
        self.enabled = True
        self.peft_type = "BEFT" if all(type(m) is nn.Linear for m in modules.values()) else None

    def remove(self, model: nn.Module) -> None:
        """Delete the added biases and restore the base values of the others."""
        for path in self.paths:
            m = model.get_submodule(path)
            if path in self._added:
                m.bias = None
            else:
                copy_into(m.bias, self._original[path])
                m.bias.requires_grad_(False)
        self._forget()

    # ---- saving ------------------------------------------------------------------------------------------

    def _trained_bias(self, model: nn.Module, path: str) -> Tensor:
        """The trained bias (out,), also while the method is disabled."""
        if path in self._added:
            return self._added[path]
        return self._trained[path] if not self.enabled else model.get_submodule(path).bias

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        out = {}
        for path in self.paths:
            trained = self._trained_bias(model, path).detach().float()
            base = self._original[path].to(trained.device).float() if path in self._original else 0.0
            out[f"{PEFT_PREFIX}{path}.beft_bias"] = (trained - base).unsqueeze(0)  # (1, out), float32
        return out

    @torch.no_grad()
    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        self.set_enabled(model, True)
        expected = {f"{PEFT_PREFIX}{p}.beft_bias": (1, model.get_submodule(p).bias.shape[0]) for p in self.paths}
        check_tensors(expected, tensors, "BitFit adapter")
        for path in self.paths:
            bias = model.get_submodule(path).bias
            delta = tensors[f"{PEFT_PREFIX}{path}.beft_bias"][0].to(torch.float32)
            base = self._original.get(path, torch.zeros(bias.shape)).to(torch.float32)
            copy_into(bias, base + delta)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        if self.peft_type == "BEFT":
            return {
                "peft_type": "BEFT",
                "task_type": "CAUSAL_LM",
                "target_modules": sorted({p.rsplit(".", 1)[-1] for p in self.paths}),
                "init_weights": True,
                "inference_mode": True,
                "modules_to_save": None,
            }
        return {
            "format": FORMAT,
            "format_version": 1,
            "modules": list(self.paths),
            "added_bias": list(self._added),
        }

    # ---- switching, merging, baking ----------------------------------------------------------------------

    @torch.no_grad()
    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Off: added biases are detached from their layers and the others hold their base values again, so
        the model computes exactly the base output. On: the trained values come back."""
        if enabled == self.enabled:
            return
        for path in self.paths:
            m = model.get_submodule(path)
            if path in self._added:
                m.bias = self._added[path] if enabled else None
            elif enabled:
                copy_into(m.bias, self._trained.pop(path))
            else:
                self._trained[path] = m.bias.detach().to("cpu", copy=True)
                copy_into(m.bias, self._original[path])
        self.enabled = enabled

    def merge(self, model: nn.Module) -> None:
        """Nothing to do: the trained biases already are the layers' biases."""

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to do (see merge)."""

    def bake(self, model: nn.Module) -> None:
        """Keep the trained biases and make the architecture say so, so save_pretrained / from_pretrained
        round-trips: a Llama-style config gets ``attention_bias`` / ``mlp_bias`` set, and the other linears of
        those groups get zero biases. Raises ValueError when the architecture has no switch for a trained bias
        (Qwen2's o_proj or MLP, for example)."""
        self.set_enabled(model, True)
        switches, zero_biases = self._bake_plan(model)
        config = copy.deepcopy(model.config)
        for flag in switches:
            setattr(config, flag, True)
        with torch.device("meta"):
            reference = type(model)(config)
        want = {n for n, _ in reference.named_parameters() if n.endswith(".bias")}
        have = {n for n, _ in model.named_parameters() if n.endswith(".bias")} | {f"{p}.bias" for p in zero_biases}
        if want != have:
            extra = sorted(have - want) or sorted(want - have)
            raise ValueError(
                f"BitFitConfig.targets = {self.config.targets!r}: {type(model).__name__} has no config switch for "
                f"biases such as {', '.join(extra[:3])}, so a baked model would not reload; train only biases the "
                f"architecture can hold, or keep the adapter unbaked"
            )
        for flag in switches:
            setattr(model.config, flag, True)
        for path in zero_biases:
            m = model.get_submodule(path)
            m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))
        model.requires_grad_(False)
        self._forget()

    def _bake_plan(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """(config switches to turn on, paths of linears that then need a zero bias)."""
        blocks_path, blocks = find_blocks(model)
        switches = []
        for flag, group_names in BIAS_SWITCHES.items():
            in_group = [p for p in self._added if p.split(".")[len(blocks_path.split(".")) + 1] in group_names]
            if in_group and hasattr(model.config, flag):
                switches.append(flag)
        zero_biases = []
        for i, block in enumerate(blocks):
            for child_name, child in block.named_children():
                flag = next((f for f, names in BIAS_SWITCHES.items() if child_name in names), None)
                if flag not in switches:
                    continue
                for name, m in child.named_modules():
                    if type(m) is nn.Linear and m.bias is None:
                        zero_biases.append(f"{blocks_path}.{i}.{child_name}.{name}")
        return switches, zero_biases


register(MethodSpec(
    name="bitfit", label="BitFit (bias terms only)", family="selective", lr=1e-3, goals=("smallest",),
    blurb="Only biases train; Llama-style linears without a bias get a zero-initialised one.",
    label_zh="BitFit（只训练偏置项）",
    blurb_zh="选择性微调：只训练偏置项；没有偏置的 Llama 式线性层会补上一个初始为零的偏置。",
    config_cls=BitFitConfig, method_cls=BitFitMethod,
))
