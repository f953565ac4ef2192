"""P-Tuning v1 (Liu et al. 2021, "GPT Understands, Too").

The m input-layer prompt vectors come from a small prompt encoder, trained with the model frozen:

    e = embedding rows (m, d)
    lstm:  P = W₂·ReLU(W₁·BiLSTM(e) + b₁) + b₂     BiLSTM: 2 layers, hidden h per direction -> (m, 2h);
                                                    W₁ (2h, 2h), W₂ (2h -> d)
    mlp:   P = MLP(e), d -> h -> h -> d with ReLU between the three linears
    h_out = Model([P ; E(x)]),  mask = [1_m ; mask]

The architecture is PEFT's ``PromptEncoder`` (so trainable counts agree with peft); h = ``encoder_hidden``.
Trainable parameters:
    mlp   m·d + (d·h + h) + (h·h + h) + (h·d + d)
    lstm  m·d + 2·[4h(d+h) + 8h] + 2·[4h(2h+h) + 8h] + (2h·2h + 2h) + (2h·d + d)
Saved as PEFT ``P_TUNING``: ``prompt_embeddings`` (m, d) = the encoder output P. A loaded adapter holds P itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import ModelShape, model_shape
from ..config import MethodConfig, knob
from .registry import MethodSpec, register
from .virtual_tokens import PromptMethod, adapter_placement

LSTM_LAYERS = 2  # PEFT's encoder_num_layers default; fixed here


@dataclass
class PTuningConfig(MethodConfig):
    method: ClassVar[str] = "p_tuning"
    num_virtual_tokens: int = knob(20, "Number m of virtual tokens produced by the prompt encoder.", min=1,
                                   help_zh="提示编码器生成的虚拟 token 数 m。")
    encoder_type: Literal["lstm", "mlp"] = knob("mlp", "Prompt encoder: BiLSTM followed by an MLP, or an MLP alone.",
                                                help_zh="提示编码器：BiLSTM 接 MLP，或只用 MLP。")
    encoder_hidden: int = knob(128, "Hidden size of the prompt encoder.", min=1, help_zh="提示编码器的隐藏层大小。")



class PromptEncoder(nn.Module):
    """P = encoder(e), e (m, d) a trainable embedding table. Returns (m, d)."""

    def __init__(self, m: int, d: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Parameter(torch.randn(m, d))  # like nn.Embedding: N(0, 1)
        if kind == "lstm":
            self.lstm = nn.LSTM(d, hidden, num_layers=LSTM_LAYERS, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        else:
            self.mlp = nn.Sequential(
                nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d)
            )

    def forward(self) -> Tensor:
        e = self.embedding
        if self.kind == "lstm":
            e = self.lstm(e.unsqueeze(0))[0][0]  # (m, 2h)
        return self.mlp(e)  # (m, d)


class PTuningMethod(PromptMethod):
    config_cls = PTuningConfig
    peft_type = "P_TUNING"

    def build_module(self, model: nn.Module, shape: ModelShape) -> nn.Module:
        device, dtype = adapter_placement(model)
        c = self.config
        encoder = PromptEncoder(c.num_virtual_tokens, shape.hidden_size, c.encoder_hidden, c.encoder_type)
        return encoder.to(device, dtype)

    def expected_trainable(self, model: nn.Module) -> int:
        """N (m = num_virtual_tokens, d the hidden size, h = encoder_hidden):
            mlp   m·d + (d·h + h) + (h·h + h) + (h·d + d)
            lstm  m·d + 2·[4h(d+h) + 8h] + 2·[4h(2h+h) + 8h] + (2h·2h + 2h) + (2h·d + d)
        (each LSTM layer and direction: W_ih (4h, in), W_hh (4h, h) and two biases (4h,); in = d, then 2h)."""
        c = self.config
        m, d, h = c.num_virtual_tokens, model_shape(model).hidden_size, c.encoder_hidden
        if c.encoder_type == "lstm":
            lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
            return m * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
        return m * d + (d * h + h) + (h * h + h) + (h * d + d)

    def extra_peft_config(self, shape: ModelShape) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": self.config.encoder_type.upper(),
            "encoder_hidden_size": self.config.encoder_hidden,
            "encoder_num_layers": LSTM_LAYERS,
            "encoder_dropout": 0.0,
        }


register(MethodSpec(
    name="p_tuning", label="P-Tuning v1", family="additive", lr=1e-2, virtual_tokens=True,
    blurb="Input-layer virtual tokens produced by a prompt encoder (LSTM+MLP or MLP).",
    label_zh="P-Tuning v1（提示编码器）",
    blurb_zh="加性微调：输入层的虚拟 token 由提示编码器（LSTM+MLP 或 MLP）生成。",
    config_cls=PTuningConfig, method_cls=PTuningMethod,
))
