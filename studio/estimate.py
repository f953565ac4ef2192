"""Before a run starts: trainable / total parameters on the real model shape, and a peak-memory estimate.

The method is applied to the model built on PyTorch's ``meta`` device by core.preflight.dry_run (shapes only,
no weights, ~0.1 s), so the count is exact and config errors (a target module that does not exist, a rank
above the hidden size) show up before any work starts.

Peak memory (an estimate, shown as such):
    weights      total · bytes/param                (2 bytes under bf16-mixed, 4 under fp32: core.models.resolve_precision)
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

from core.config import MethodConfig, TrainConfig
from core.methods import spec_of
from core.models import ModelNotFoundError, load_model_config, resolve_precision
from core.preflight import dry_run

from .i18n import t

GB = 1024**3


@dataclass
class Estimate:
    trainable: int
    total: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    note: str = ""  # a studio.i18n key

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes

    def markdown(self) -> str:
        gb = lambda b: f"{b / GB:.2f} GB" if b >= GB / 10 else f"{b / 2**20:.0f} MB"  # noqa: E731
        text = t("estimate.summary", trainable=f"{self.trainable:,}", total=f"{self.total:,}",
                 percent=f"{self.percent:.3g}", peak=gb(self.peak_bytes), weights=gb(self.weights_bytes),
                 optimizer=gb(self.grads_bytes + self.optimizer_bytes), activations=gb(self.activation_bytes))
        return text + ("  \n" + t(self.note) if self.note else "")


class Estimator:
    """Caches each model's config (one small JSON read per model name); thread-safe."""

    def __init__(self) -> None:
        self._configs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def model_config(self, model: str):
        with self._lock:
            if model not in self._configs:
                try:
                    self._configs[model] = load_model_config(model)
                except ModelNotFoundError as e:
                    raise ValueError(str(e)) from None
            return self._configs[model]

    def estimate(self, model: str, method_cfg: MethodConfig, train: TrainConfig, seq_len: int | None = None,
                 device: str = "cpu") -> Estimate:
        seq = min(train.max_len, seq_len or train.max_len)
        run = dry_run(self.model_config(model), method_cfg, seq)  # ValueError names the field
        trainable, total, shape, m = run.trainable, run.total, run.shape, run.model
        virtual = int(getattr(method_cfg, "num_virtual_tokens", 0) or 0) if spec_of(method_cfg).virtual_tokens else 0
        ff = int(getattr(m.config, "intermediate_size", None) or 4 * shape.hidden_size)
        bytes_per = 2 if resolve_precision(train.precision, torch.device(device)) == "bf16-mixed" else 4
        t = seq + virtual
        b, d, layers = train.batch_size, shape.hidden_size, shape.num_layers
        if train.grad_checkpointing:
            acts = b * t * layers * d * bytes_per + b * t * (34 * d + 6 * ff) * bytes_per // 2
        else:
            acts = b * t * layers * (34 * d + 6 * ff) * bytes_per // 2
        logits = b * t * shape.vocab_size * 4 * 2
        note = ""
        if seq_len is None:
            note = "estimate.no_dataset"
        return Estimate(trainable, total, total * bytes_per, trainable * 4, trainable * 8, acts + logits, note)
