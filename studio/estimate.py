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

Training time (an estimate, shown as such): steps × FLOPs per step / (this machine's measured matmul rate ·
EFFICIENCY). A step of ``tokens`` positions, ``supervised`` of them trained, costs

    tokens · (4 · N_body + 2 · trainable)  +  supervised · 4 · d · V

(forward 2·N, the backward's input gradients 2·N, weight gradients 2 per trainable parameter; the LM head runs at
supervised positions only, core.forward). N_body excludes the embedding table, a lookup. The matmul rate is
measured once per process (``matmul_rate``, ~0.3 s) in the run's precision. The number of steps and the tokens
per step come from the form and the loaded dataset (its mean length), else from max_len.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.config import DataConfig, MethodConfig, TrainConfig
from core.data.batching import val_size
from core.events import duration
from core.methods import spec_of
from core.models import ModelNotFoundError, load_model_config, resolve_precision
from core.preflight import dry_run

from .i18n import t

GB = 1024**3
EFFICIENCY = 0.5  # the share of the plain matmul rate a whole training step reaches; bench/first_run.py reports it


@dataclass
class Estimate:
    trainable: int
    total: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    note: str = ""  # a studio.i18n key
    steps: int = 0  # optimiser steps the run will take (0: unknown, no dataset)
    train_seconds: float | None = None  # training time, load and final evaluation excluded

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
        if self.train_seconds is not None:
            text += "  \n" + t("estimate.training", duration=duration(self.train_seconds), steps=self.steps)
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
                 device: str = "cpu", data: tuple[dict, DataConfig] | None = None) -> Estimate:
        """``data``: the loaded dataset's length stats (core.data.length_stats) and its DataConfig, for the
        number of steps and the tokens per step of the time estimate."""
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
        est = Estimate(trainable, total, total * bytes_per, trainable * 4, trainable * 8, acts + logits, note)
        if data is not None and data[0].get("n"):
            stats, data_cfg = data
            est.steps = planned_steps(train, train_rows(stats["n"], data_cfg))
            mean = min(train.max_len, stats["mean"]) + virtual
            supervised = min(stats["supervised_tokens"] / stats["n"], mean)
            flops = step_flops(shape, total, trainable, train.batch_size * mean, train.batch_size * supervised)
            precision = resolve_precision(train.precision, torch.device(device))
            est.train_seconds = est.steps * flops / (matmul_rate(device, precision) * EFFICIENCY)
        return est


def train_rows(rows: int, data: DataConfig) -> int:
    """Rows left for training after the validation split."""
    return rows - val_size(rows, data.val_fraction, data.val_count)


def planned_steps(train: TrainConfig, rows: int) -> int:
    """Optimiser steps of a run on ``rows`` training rows (core.train's rule)."""
    if train.max_steps > 0:
        return train.max_steps
    return max(1, math.ceil(train.epochs * math.ceil(rows / train.batch_size) / train.grad_accum))


def step_flops(shape, total: int, trainable: int, tokens: float, supervised: float) -> float:
    body = total - shape.vocab_size * shape.hidden_size
    return tokens * (4 * body + 2 * min(trainable, body)) + supervised * 4 * shape.hidden_size * shape.vocab_size


RATE_TTL_S = 300.0  # the machine's load changes (a run starts, chat): measure again after this long
_rates: dict[tuple[str, str], tuple[float, float]] = {}


def matmul_rate(device: str, precision: str) -> float:
    """FLOP/s of a SmolLM2-sized matmul (512 × 576 by 576 × 1536) on ``device`` now, measured for ~0.25 s
    (at most once per RATE_TTL_S per device and precision)."""
    key = (device, precision)
    if key in _rates and time.monotonic() - _rates[key][0] < RATE_TTL_S:
        return _rates[key][1]
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    a = torch.randn(512, 576, dtype=dtype, device=device)
    b = torch.randn(576, 1536, dtype=dtype, device=device)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < 0.25:
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        n += 1
    _rates[key] = (time.monotonic(), n * 2 * 512 * 576 * 1536 / elapsed)
    return _rates[key][1]
