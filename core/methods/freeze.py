"""Freeze (partial fine-tuning): only the top N transformer blocks, plus a few named top-level modules, train.

With L blocks, blocks L−N .. L−1 train in place; everything else keeps its pre-trained value. ``extra_modules``
names modules outside the blocks, by their short name ('norm', 'ln_f', 'lm_head', 'embed_tokens'), their dotted
path ('model.norm'), or two generic aliases that work on every model: 'norm' (the final norm, whatever it is
called) and 'lm_head' (the output embeddings). With tied embeddings 'lm_head' is the embedding matrix too.

Saved as the trained tensors only (safetensors, Hugging Face parameter names); merging is a no-op because the
weights are trained in place. Enable/disable, remove and bake come from full.InPlaceMethod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from torch import nn

from ..blocks import depth_map, find_blocks
from ..config import MethodConfig, knob
from .registry import MethodSpec, register
from .full import InPlaceMethod


@dataclass
class FreezeConfig(MethodConfig):
    method: ClassVar[str] = "freeze"
    top_n: int = knob(2, "Train only the top N transformer blocks.", min=1, help_zh="只训练顶部 N 个 Transformer 层。")
    extra_modules: list[str] = knob(["norm"], "Also train these top-level modules, e.g. 'norm', 'lm_head'.",
                                    help_zh="同时训练这些顶层模块，例如 'norm'、'lm_head'。")



def top_level_modules(model: nn.Module) -> dict[str, list[str]]:
    """{module name or alias: names (as in named_parameters) of its parameters} for modules outside the blocks."""
    blocks_path, _ = find_blocks(model)
    canonical = {id(p): n for n, p in model.named_parameters()}
    head = model.get_output_embeddings()
    out: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if path == blocks_path or path.startswith(blocks_path + "."):
            continue
        own = [canonical[id(p)] for p in module.parameters(recurse=False)]
        if not own:
            continue
        keys = {path, path.rsplit(".", 1)[-1]}
        if module is head:
            keys.add("lm_head")
        elif "norm" in type(module).__name__.lower():
            keys.add("norm")
        for key in keys:
            out.setdefault(key, [])
            out[key] += [n for n in own if n not in out[key]]
    return out


class FreezeMethod(InPlaceMethod):
    config_cls = FreezeConfig
    format_note = "trained tensors only (top blocks + extra modules) under their Hugging Face parameter names"

    def select(self, model: nn.Module) -> list[str]:
        cfg: FreezeConfig = self.config  # type: ignore[assignment]
        num_layers = len(find_blocks(model)[1])
        if cfg.top_n > num_layers:
            raise ValueError(f"FreezeConfig.top_n = {cfg.top_n} is invalid: the model has only {num_layers} blocks")
        modules = top_level_modules(model)
        unknown = [m for m in cfg.extra_modules if m not in modules]
        if unknown:
            available = sorted(k for k in modules if "." not in k)
            raise ValueError(
                f"FreezeConfig.extra_modules: {unknown} not found; available: {', '.join(available)}"
            )
        names = [n for n, d in depth_map(model).items() if d is not None and num_layers - cfg.top_n <= d < num_layers]
        for m in cfg.extra_modules:
            names += [n for n in modules[m] if n not in names]
        return names


    def expected_trainable(self, model: nn.Module) -> int:
        """N = Σ_{l = L−top_n}^{L−1} numel(block l) + Σ numel(t) over the tensors t of the extra modules, each
        tensor once (with tied embeddings 'lm_head' and 'embed_tokens' are one tensor)."""
        cfg: FreezeConfig = self.config  # type: ignore[assignment]
        blocks = list(find_blocks(model)[1])
        tensors = {id(p): p for block in blocks[len(blocks) - cfg.top_n :] for p in block.parameters()}
        params = dict(model.named_parameters())
        modules = top_level_modules(model)
        for m in cfg.extra_modules:
            tensors.update({id(params[n]): params[n] for n in modules[m]})
        return sum(p.numel() for p in tensors.values())

__all__ = ["FreezeMethod", "top_level_modules"]


register(MethodSpec(
    name="freeze", label="Freeze (train the top N blocks)", family="selective", lr=1e-4, trains_base=True,
    blurb="Partial fine-tuning: only the top N blocks (and optional modules) train.",
    label_zh="Freeze（只训练顶部 N 层）",
    blurb_zh="冻结部分参数：只训练顶部 N 个 Transformer 层（以及可选的模块）。",
    config_cls=FreezeConfig, method_cls=FreezeMethod,
))
