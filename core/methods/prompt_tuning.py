"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

m trainable soft-token embeddings P (m, d) are put before the input embeddings; the model is frozen:

    h = Model([P ; E(x)]),   mask = [1_m ; mask]          (B, m+T, d)

Trainable parameters: m·d. Saved as PEFT ``PROMPT_TUNING``: ``prompt_embeddings`` (m, d).

Initialisation (``PromptTuningConfig.init``):
    random   N(0, σ²) with σ the standard deviation of the model's embedding matrix (PEFT uses σ = 1)
    vocab    the embeddings of m token ids sampled uniformly from the vocabulary
    text     the embeddings of ``init_text``'s token ids, cut or repeated cyclically to m (as PEFT does).
             Needs a tokenizer: set ``method.tokenizer = tokenizer`` before ``apply``. Without one (for example
             when ``load_adapter`` rebuilds the method, which then loads the trained rows anyway) the prompt
             starts from sampled vocabulary and a warning says so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, ClassVar

import torch
from torch import nn

from ..blocks import ModelShape, model_shape
from ..config import MethodConfig, _fail, knob
from .registry import MethodSpec, register
from .virtual_tokens import PromptMethod, VirtualTable, adapter_placement


@dataclass
class PromptTuningConfig(MethodConfig):
    method: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int = knob(20, "Number m of soft tokens prepended to the input.", min=1,
                                   help_zh="加在输入前面的软提示 token 数 m。")
    init: Literal["random", "vocab", "text"] = knob("vocab", "Initialise from random noise, sampled vocabulary, or a text.",
                                                    help_zh="初始化方式：随机噪声、从词表采样，或一段文本。")
    init_text: str = knob("", "Text whose token embeddings initialise the prompt (init='text').",
                          help_zh="用这段文本的 token 嵌入初始化提示（init='text' 时）。")

    def validate(self) -> None:
        if self.init == "text" and not self.init_text.strip():
            _fail(type(self).__name__, "init_text", self.init_text, "must be non-empty when init='text'")



class PromptTuningMethod(PromptMethod):
    config_cls = PromptTuningConfig
    peft_type = "PROMPT_TUNING"

    def __init__(self, config: PromptTuningConfig):
        super().__init__(config)
        #: optional tokenizer for init='text': called as tokenizer(text)["input_ids"], like PEFT
        self.tokenizer = None

    def build_module(self, model: nn.Module, shape: ModelShape) -> nn.Module:
        return VirtualTable(self.initial_prompt(model))

    @torch.no_grad()
    def initial_prompt(self, model: nn.Module) -> torch.Tensor:
        """The (m, d) starting rows, fp32, on the embedding's device."""
        embed = model.get_input_embeddings()
        device, dtype = adapter_placement(model)
        m, vocab = self.config.num_virtual_tokens, embed.weight.shape[0]
        init = self.config.init
        if init == "text" and self.tokenizer is None:
            warnings.warn("prompt_tuning: init='text' without a tokenizer (set method.tokenizer); using init='vocab'")
            init = "vocab"
        if init == "random":
            std = 1.0 if embed.weight.is_meta else embed.weight.float().std().item()  # meta: a dry run
            return torch.randn(m, embed.weight.shape[1], device=device, dtype=dtype) * std
        if init == "vocab":
            ids = torch.randint(0, vocab, (m,), device=device)
        else:
            ids = torch.tensor(text_token_ids(self.tokenizer, self.config.init_text, m), device=device)
            if int(ids.max()) >= vocab:
                raise ValueError(f"PromptTuningConfig.init_text: token id {int(ids.max())} is outside the vocabulary")
        return embed(ids).to(dtype)

    def expected_trainable(self, model: nn.Module) -> int:
        """N = m·d: the prompt P (m, d), m = num_virtual_tokens, d the hidden size."""
        return self.config.num_virtual_tokens * model_shape(model).hidden_size

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        # The trained rows are in the file, so PEFT needs no init: RANDOM (TEXT would make it load a tokenizer).
        return {
            **super().adapter_config(model),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }


def text_token_ids(tokenizer, text: str, m: int) -> list[int]:
    """tokenizer(text)["input_ids"], cut to m or repeated cyclically up to m (PEFT's TEXT init)."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"PromptTuningConfig.init_text = {text!r} is invalid: it tokenizes to nothing")
    return (ids * math.ceil(m / len(ids)))[:m]


register(MethodSpec(
    name="prompt_tuning", label="Prompt tuning", family="additive", lr=3e-2, needs_tokenizer=True,
    virtual_tokens=True, goals=("smallest", "frozen_base"),
    blurb="m trainable soft tokens in front of the input; the model itself is untouched.",
    label_zh="Prompt Tuning（软提示）",
    blurb_zh="加性微调：在输入前加 m 个可训练的软提示 token，模型本身不变。",
    config_cls=PromptTuningConfig, method_cls=PromptTuningMethod,
))
