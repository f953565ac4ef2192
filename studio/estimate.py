"""Before a run starts: trainable / total parameters on the real model shape, and a peak-memory estimate.

The method is applied to the model built on PyTorch's ``meta`` device (shapes only, no weights, ~0.1 s), so
the count is exact and config errors (a target module that does not exist, a rank above the hidden size) show
up before any work starts. Full fine-tuning and Freeze keep copies of the original weights, which a meta
tensor cannot give, so for them the count comes from their parameter selection (``select``) alone.

Peak memory (an estimate, shown as such):
    weights      total · bytes/param                (fp32 on CPU, bf16 on a GPU that supports it)
    gradients    trainable · 4                      (trainable parameters are kept in fp32)
    optimiser    trainable · 8                      (AdamW: two fp32 moments)
    activations  B · T · L · (34·d + 6·d_ff) · bytes/2, or B · T · L · d · bytes + one layer's worth with
                 gradient checkpointing (Korthikanti et al. 2022, memory-efficient attention, no T² term)
    logits       B · T · V · 4 · 2                  (fp32 logits of the supervised positions and their grad)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.blocks import model_shape
from core.config import FreezeConfig, FullConfig, MethodConfig, TrainConfig
from core.methods import build_method
from core.models import resolve_model_path

GB = 1024**3


@dataclass
class Estimate:
    trainable: int
    total: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    note: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes

    def markdown(self) -> str:
        gb = lambda b: f"{b / GB:.2f} GB" if b >= GB / 10 else f"{b / 2**20:.0f} MB"  # noqa: E731
        text = (
            f"**Trainable parameters:** {self.trainable:,} of {self.total:,} (**{self.percent:.3g}%**)  \n"
            f"**Peak memory ≈ {gb(self.peak_bytes)}** (estimate: weights {gb(self.weights_bytes)}, "
            f"gradients + AdamW {gb(self.grads_bytes + self.optimizer_bytes)}, activations {gb(self.activation_bytes)})"
        )
        return text + (f"  \n{self.note}" if self.note else "")


class Estimator:
    """Caches each model's config (one small JSON read per model name); thread-safe."""

    def __init__(self) -> None:
        self._configs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def model_config(self, model: str):
        from transformers import AutoConfig

        with self._lock:
            if model not in self._configs:
                try:
                    self._configs[model] = AutoConfig.from_pretrained(resolve_model_path(model))
                except Exception as e:  # noqa: BLE001 - one sentence for the user
                    raise ValueError(
                        f"Model '{model}': cannot read its configuration (not a local folder, and not reachable on the "
                        f"Hugging Face Hub): {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                    ) from None
            return self._configs[model]

    def count(self, model: str, method_cfg: MethodConfig) -> tuple[int, int, nn.Module]:
        """(trainable, total, meta model with the method applied, or the bare meta model for full/freeze)."""
        from transformers import AutoModelForCausalLM

        config = self.model_config(model)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(config)
        m.requires_grad_(False)
        method = build_method(method_cfg)
        if isinstance(method_cfg, (FullConfig, FreezeConfig)):  # in-place methods: their selection, no copies
            names = method.select(m)  # type: ignore[attr-defined]
            if not names:
                raise ValueError(f"{type(method_cfg).__name__}: this configuration trains no parameter of the model")
            params = dict(m.named_parameters())
            return sum(params[n].numel() for n in names), sum(p.numel() for p in params.values()), m
        with torch.device("meta"):
            method.apply(m)  # raises ValueError naming the field when the config does not fit the model
        trainable, total = method.parameter_counts(m)
        return trainable, total, m

    def estimate(self, model: str, method_cfg: MethodConfig, train: TrainConfig, seq_len: int | None = None,
                 device: str = "cpu") -> Estimate:
        trainable, total, m = self.count(model, method_cfg)
        if trainable == 0:
            raise ValueError(f"{type(method_cfg).__name__}: this configuration trains no parameters")
        shape = model_shape(m)
        virtual = int(getattr(method_cfg, "num_virtual_tokens", 0) or 0)
        if virtual and virtual + min(train.max_len, seq_len or train.max_len) > shape.max_positions:
            raise ValueError(
                f"{type(method_cfg).__name__}.num_virtual_tokens = {virtual} is invalid: with max_len "
                f"{train.max_len} the sequence exceeds the model's context of {shape.max_positions} tokens"
            )
        ff = int(getattr(m.config, "intermediate_size", None) or 4 * shape.hidden_size)
        bytes_per = 2 if device == "cuda" else 4
        t = min(train.max_len, seq_len or train.max_len) + virtual
        b, d, layers = train.batch_size, shape.hidden_size, shape.num_layers
        if train.grad_checkpointing:
            acts = b * t * layers * d * bytes_per + b * t * (34 * d + 6 * ff) * bytes_per // 2
        else:
            acts = b * t * layers * (34 * d + 6 * ff) * bytes_per // 2
        logits = b * t * shape.vocab_size * 4 * 2
        note = ""
        if seq_len is None:
            note = "Sequence length taken as max_len; load a dataset for an estimate from its real lengths."
        return Estimate(trainable, total, total * bytes_per, trainable * 4, trainable * 8, acts + logits, note)
