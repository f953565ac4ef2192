"""P-Tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally
Across Scales and Tasks").

Deep prompts: every layer l gets m extra key/value slots, trained directly (no reparameterisation):

    table (m, 2·L·kv) trainable, kv = head_dim · kv_heads
    K_l = table[:, slot 2l], V_l = table[:, slot 2l+1], each reshaped to (kv_heads, m, head_dim)
    h_out = Model(x, cache = {(K_l, V_l)}),  mask = [1_m ; mask]; real tokens sit at positions m..m+T-1

Trainable parameters: m·2·L·kv. Saved as PEFT ``PREFIX_TUNING`` with ``prefix_projection: false``.

Initialisation: the model's own keys and values for m token ids sampled from the vocabulary (computed once,
at positions 0..m-1, where the prefix sits), so training starts from activations the layers have seen rather
than PEFT's N(0, 1) rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..blocks import ModelShape, model_shape
from ..config import MethodConfig, knob
from .registry import MethodSpec, register
from .virtual_tokens import PrefixMethod, VirtualTable, adapter_placement, cache_table, output_cache


@dataclass
class PTuningV2Config(MethodConfig):
    method: ClassVar[str] = "p_tuning_v2"
    num_virtual_tokens: int = knob(20, "Deep prompt length in every layer.", min=1, help_zh="每一层深度提示的长度。")



class PTuningV2Method(PrefixMethod):
    config_cls = PTuningV2Config
    peft_type = "PREFIX_TUNING"

    def build_module(self, model: nn.Module, shape: ModelShape) -> nn.Module:
        return VirtualTable(self.initial_table(model, shape))

    @torch.no_grad()
    def initial_table(self, model: nn.Module, shape: ModelShape) -> torch.Tensor:
        device, dtype = adapter_placement(model)
        ids = torch.randint(0, shape.vocab_size, (1, self.config.num_virtual_tokens), device=device)
        was_training = model.training
        model.eval()  # no dropout in the sampled activations
        try:
            cache = output_cache(model.base_model(input_ids=ids, use_cache=True))
        finally:
            model.train(was_training)
        return cache_table(cache, shape.num_layers).to(dtype)  # (m, 2·L·kv)

    def expected_trainable(self, model: nn.Module) -> int:
        """N = m·2·L·kv: the table (m, 2·L·kv), m = num_virtual_tokens, kv = head_dim · kv_heads."""
        s = model_shape(model)
        return self.config.num_virtual_tokens * 2 * s.num_layers * s.kv_dim

    def extra_peft_config(self, shape: ModelShape) -> dict[str, Any]:
        return {"init_weights": None, "encoder_hidden_size": None, "prefix_projection": False}


register(MethodSpec(
    name="p_tuning_v2", label="P-Tuning v2 (deep prompts)", family="additive", lr=1e-2, virtual_tokens=True,
    goals=("smallest",),
    blurb="Prompts in every layer, trained directly (no reparameterisation).",
    label_zh="P-Tuning v2（深度提示）",
    blurb_zh="加性微调：每一层都有提示向量，直接训练（不做重参数化）。",
    config_cls=PTuningV2Config, method_cls=PTuningV2Method,
))
