"""Bottleneck adapters after the attention and/or MLP of every block (Houlsby et al. 2019, arXiv:1902.00751;
Pfeiffer et al. 2020, arXiv:2005.00247 for the MLP-only placement).

Each adapted module's output h (B, T, d) passes through a small residual bottleneck:

    h' = h + W_up·act(W_down·h + b_down) + b_up      W_down: (r, d)   W_up: (d, r)   r = bottleneck

W_down starts as nn.Linear does (kaiming-uniform); W_up and b_up start at zero, so h' = h and the adapted model
equals the base model at initialisation. Only the adapters train.

Placement: ``houlsby`` adapts the attention module and the MLP of every block, ``pfeiffer`` only the MLP,
``attn`` only the attention. The adapter sits on the module's output, before the residual add of the block.
Attention modules return a tuple (output, weights, ...); only the first element is adapted.

Saved format (our own; PEFT has no bottleneck adapter). adapter_model.safetensors holds, for every adapted
module path P (for example ``model.layers.0.self_attn`` or ``transformer.h.1.mlp``):

    P.adapter.down.weight   (r, d)        P.adapter.down.bias   (r,)
    P.adapter.up.weight     (d, r)        P.adapter.up.bias     (d,)

adapter_config.json: {"format": "peft_studio.bottleneck_adapter", "format_version": 1, "bottleneck": r,
"hidden_size": d, "placement", "activation", "modules": [P, ...]}. The keys are also the parameter names inside
the adapted model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import find_blocks, model_shape
from ..config import MethodConfig, knob
from .registry import MethodSpec, register
from .base import Method, check_tensors, copy_into
from .lora import replace_module

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
FORMAT = "peft_studio.bottleneck_adapter"


@dataclass
class AdapterConfig(MethodConfig):
    method: ClassVar[str] = "adapter"
    bottleneck: int = knob(16, "Bottleneck width r of x + W_up·act(W_down·x).", min=1,
                           help_zh="x + W_up·act(W_down·x) 的瓶颈宽度 r。")
    placement: Literal["houlsby", "pfeiffer", "attn"] = knob(
        "houlsby", "houlsby: after attention and FFN; pfeiffer: after FFN only; attn: after attention only.",
        help_zh="houlsby：注意力和 FFN 之后都加；pfeiffer：只在 FFN 之后；attn：只在注意力之后。",
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = knob("relu", "Non-linearity inside the bottleneck.",
                                                               help_zh="瓶颈内部的非线性激活函数。")



class Bottleneck(nn.Module):
    """h -> h + up(act(down(h))) on (..., d), computed in float32 and returned in h's dtype."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, device: torch.device):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=torch.float32)  # (r, d)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=torch.float32)  # (d, r)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class AdaptedOutput(nn.Module):
    """Wraps a block's attention or MLP ``base_layer`` and passes its output through a Bottleneck."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.enabled = True
        self.train(base_layer.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        if isinstance(out, tuple):  # attention: (output (B, T, d), weights, ...)
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _child(block: nn.Module, names: tuple[str, ...], what: str, block_path: str) -> str:
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    raise ValueError(
        f"AdapterConfig.placement: block {block_path} has no {what} module (looked for {', '.join(names)}); "
        f"choose a placement without it ('houlsby', 'pfeiffer' = MLP only, 'attn' = attention only)"
    )


class AdapterMethod(Method):
    config_cls = AdapterConfig
    peft_type = None
    can_merge = False  # the bottleneck is non-linear: it cannot be folded into a weight
    config: AdapterConfig

    @staticmethod
    def wrappers(model: nn.Module) -> dict[str, AdaptedOutput]:
        """{module path: AdaptedOutput} of the adapted attention / MLP modules."""
        return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedOutput)}

    def target_paths(self, model: nn.Module) -> list[str]:
        """Paths of the modules the placement adapts, block by block (attention before MLP)."""
        placement = self.config.placement
        blocks_path, blocks = find_blocks(model)
        paths = []
        for i, block in enumerate(blocks):
            block_path = f"{blocks_path}.{i}"
            if placement in ("houlsby", "attn"):
                paths.append(f"{block_path}.{_child(block, ATTENTION_NAMES, 'attention', block_path)}")
            if placement in ("houlsby", "pfeiffer"):
                paths.append(f"{block_path}.{_child(block, MLP_NAMES, 'MLP', block_path)}")
        return paths

    def apply(self, model: nn.Module) -> None:
        if self.wrappers(model):
            raise ValueError("adapters are already applied to this model; call remove() first")
        cfg = self.config
        paths = self.target_paths(model)
        hidden = model_shape(model).hidden_size
        device = next(model.parameters()).device
        model.requires_grad_(False)
        for path in paths:
            adapter = Bottleneck(hidden, cfg.bottleneck, cfg.activation, device)
            replace_module(model, path, AdaptedOutput(model.get_submodule(path), adapter))
        self.enabled = True

    def expected_trainable(self, model: nn.Module) -> int:
        """N = k·L·(2·r·d + r + d): per adapted module W_down (r, d), b_down (r,), W_up (d, r), b_up (d,);
        k = 2 adapted modules per block for 'houlsby', 1 for 'pfeiffer' and 'attn'; L blocks, d the hidden size,
        r the bottleneck."""
        shape = model_shape(model)
        r, d = self.config.bottleneck, shape.hidden_size
        k = 2 if self.config.placement == "houlsby" else 1
        return k * shape.num_layers * (2 * r * d + r + d)

    def remove(self, model: nn.Module) -> None:
        for path, wrapper in self.wrappers(model).items():
            replace_module(model, path, wrapper.base_layer)

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        return {
            f"{path}.adapter.{name}": p
            for path, wrapper in self.wrappers(model).items()
            for name, p in wrapper.adapter.named_parameters()
        }

    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        params = self.adapter_tensors(model)
        check_tensors({k: tuple(p.shape) for k, p in params.items()}, tensors, "bottleneck adapter")
        for k, p in params.items():
            copy_into(p, tensors[k])

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.config
        return {
            "format": FORMAT,
            "format_version": 1,
            "bottleneck": cfg.bottleneck,
            "hidden_size": model_shape(model).hidden_size,
            "placement": cfg.placement,
            "activation": cfg.activation,
            "modules": list(self.wrappers(model)),
        }

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        for wrapper in self.wrappers(model).values():
            wrapper.enabled = enabled
        self.enabled = enabled


register(MethodSpec(
    name="adapter", label="Adapter (bottleneck)", family="additive", lr=1e-3, goals=("multitask", "frozen_base"),
    blurb="x + W_up·act(W_down·x) inserted after attention and/or FFN; starts as the identity.",
    label_zh="Adapter（瓶颈模块）",
    blurb_zh="加性微调：在注意力和/或 FFN 之后插入 x + W_up·act(W_down·x)，初始为恒等映射。",
    config_cls=AdapterConfig, method_cls=AdapterMethod,
))
