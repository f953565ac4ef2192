"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every layer l attends to m extra key/value slots (K_l, V_l) ahead of the real tokens. Training the table
directly is unstable, so while training it is reparameterised through an MLP (PEFT's prefix_projection):

    e = embedding rows (m, kv)                       kv = head_dim · kv_heads (the KV width, GQA-aware)
    table = W₂·tanh(W₁·e + b₁) + b₂                  W₁ (kv -> h), W₂ (h -> 2·L·kv);  table (m, 2·L·kv)
    K_l = table[:, slot 2l], V_l = table[:, slot 2l+1], each reshaped to (kv_heads, m, head_dim)
    h_out = Model(x, cache = {(K_l, V_l)}),  mask = [1_m ; mask]; real tokens sit at positions m..m+T-1

Trainable parameters: m·kv + (kv·h + h) + (h·2L·kv + 2L·kv), h = ``encoder_hidden``; same as PEFT.
Saved as PEFT ``PREFIX_TUNING`` with ``prefix_projection: true``: ``prompt_embeddings`` = the computed table.
A loaded adapter holds the table itself (the MLP cannot be recovered from it), as PEFT's inference mode does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import ModelShape, model_shape
from ..config import MethodConfig, knob
from .registry import MethodSpec, register
from .virtual_tokens import PrefixMethod, adapter_placement


@dataclass
class PrefixTuningConfig(MethodConfig):
    method: ClassVar[str] = "prefix_tuning"
    num_virtual_tokens: int = knob(20, "Prefix length: key/value slots added in every layer.", min=1,
                                   help_zh="前缀长度：每一层增加的 key/value 位置数。")
    encoder_hidden: int = knob(512, "Hidden size of the reparameterising MLP.", min=1, help_zh="重参数化 MLP 的隐藏层大小。")



class PrefixEncoder(nn.Module):
    """table = MLP(e): (m, kv) -> (m, 2·L·kv)."""

    def __init__(self, m: int, kv_dim: int, hidden: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(m, kv_dim))  # like nn.Embedding: N(0, 1)
        self.mlp = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))

    def forward(self) -> Tensor:
        return self.mlp(self.embedding)  # (m, 2·L·kv)


class PrefixTuningMethod(PrefixMethod):
    config_cls = PrefixTuningConfig
    peft_type = "PREFIX_TUNING"

    def build_module(self, model: nn.Module, shape: ModelShape) -> nn.Module:
        device, dtype = adapter_placement(model)
        c = self.config
        encoder = PrefixEncoder(c.num_virtual_tokens, shape.kv_dim, c.encoder_hidden, self.table_width(shape))
        return encoder.to(device, dtype)

    def expected_trainable(self, model: nn.Module) -> int:
        """N = m·kv + (kv·h + h) + (h·W + W), W = 2·L·kv: the embedding rows (m, kv) and the two linears of the
        MLP; kv = head_dim · kv_heads, h = encoder_hidden, m = num_virtual_tokens."""
        s = model_shape(model)
        m, h, kv = self.config.num_virtual_tokens, self.config.encoder_hidden, s.kv_dim
        width = 2 * s.num_layers * kv
        return m * kv + (kv * h + h) + (h * width + width)

    def extra_peft_config(self, shape: ModelShape) -> dict[str, Any]:
        return {"init_weights": None, "encoder_hidden_size": self.config.encoder_hidden, "prefix_projection": True}


register(MethodSpec(
    name="prefix_tuning", label="Prefix tuning", family="additive", lr=1e-2, virtual_tokens=True,
    goals=("smallest", "frozen_base"),
    blurb="Trainable key/value prefixes in every layer, produced by an MLP while training.",
    label_zh="Prefix Tuning（前缀调控）",
    blurb_zh="加性微调：每一层都有可训练的 key/value 前缀，训练时由 MLP 生成。",
    config_cls=PrefixTuningConfig, method_cls=PrefixTuningMethod,
))
