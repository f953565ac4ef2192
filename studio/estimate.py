"""Before a run starts: trainable / total parameters on the real model shape, and a peak-memory estimate.

The method is applied to the model built on PyTorch's ``meta`` device by core.preflight.dry_run (shapes only,
no weights, ~0.1 s), so the count is exact and config errors (a target module that does not exist, a rank
above the hidden size) show up before any work starts.

Peak memory (an estimate, shown as such), as the engine builds it (core.train, core.forward). ``base`` is 2 bytes
an entry under bf16-mixed, 4 under fp32 (core.models.resolve_precision); S is the entries the optimiser updates
and K the bytes the method keeps besides the model, both from the method (``Method.memory``: S = the trainable
count for most methods, every entry for FishMask, whose hooks mask dense gradients; K = the copy of the trained
tensors that full fine-tuning, Freeze and FishMask keep):
    weights      (total - S) · base + S · 4        (what trains is held in fp32)
    gradients    S · 4
    optimiser    S · 8 + K                          (AdamW: two fp32 moments)
    activations  P · L · A · base, the largest packed row or piece of a batch (core.forward.packed and pieces:
                 P positions, at most piece_budget's cap unless one row is longer), through L blocks that keep A entries a position:
                 6d + 2·kv + 3·ff for the backward through a frozen block, plus the input of every block linear
                 whose weights (or a LoRA / adapter on it) train, plus H · T attention probabilities where a
                 CPU runs bf16 attention as matmuls (core.attention.grouped: T keys, H heads). With gradient
                 checkpointing: P · L · d · base plus one block's worth.
                 Plus the LM head, which runs only at supervised positions, CE_CHUNK of them at a time: one
                 (c, V) block of fp32 logits, turned into its softmax in place (4 bytes an entry, 6 while bf16
                 logits are copied to fp32).
No term for a full (B, T, V) logits tensor: the engine never builds one.

Training time (an estimate, shown as such): steps × FLOPs per step / (this machine's measured matmul rate ·
EFFICIENCY). A step of ``tokens`` positions, ``supervised`` of them trained, costs

    tokens · (4 · N_body + 2 · trainable)  +  supervised · 4 · d · V

(forward 2·N, the backward's input gradients 2·N, weight gradients 2 per trainable parameter; the LM head runs at
supervised positions only, core.forward). N_body excludes the embedding table, a lookup. Where the engine runs
the prompt prefix that a micro-batch's rows share once (core.train.shares_prefix), its tokens count once per
micro-batch, plus the cost of one more call (core.forward.piece_budget's overhead). The matmul rate is measured by ``matmul_rate`` (~0.3 s, best of 5 windows) in the run's precision. The
number of steps and the tokens per step come from the form and the loaded dataset (its mean length), else from
max_len.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core import attention, linear as core_linear
from core.config import DataConfig, MethodConfig, TrainConfig
from core.data.batching import val_size
from core.dist import DistInfo, strategy
from core.blocks import find_blocks
from core.events import duration
from core.forward import CE_CHUNK, piece_budget
from core.methods import spec_of
from core.models import ModelNotFoundError, load_model_config, resolve_precision
from core.preflight import check_train, dry_run
from core.train import shares_prefix

from .i18n import t

GB = 1024**3
# The share of the plain matmul rate (matmul_rate) a whole training step reaches, by precision; bench/first_run.py
# reports it. fp32, measured on 2 cores: 0.60 with MKL's products (AVX2, before core.linear); with oneDNN's
# (core.linear), 0.55 on AVX2 (every library held to AVX2 on an AVX-512 machine) and 0.38 on AVX-512, where the
# products run at twice MKL's rate while the rest of a step does not. bf16-mixed: 0.23-0.26 on 2 AVX512-BF16 cores,
# whose bf16 matmuls run several times their fp32 while the rest of a step (attention, norms, casts, the
# optimiser) does not.
_FP32_ONEDNN = {"AVX512": 0.4, "AVX2": 0.55}
EFFICIENCY = {
    "fp32": _FP32_ONEDNN.get(torch.backends.cpu.get_cpu_capability(), 0.6) if core_linear.ENABLED else 0.6,
    "bf16-mixed": 0.25,
}


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
    world: int = 1  # processes (GPUs) the run spans; the memory figures are per device
    parallel: str = "single"  # how they share it: ddp or fsdp (core.dist.strategy)

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
        if self.world > 1:
            text += "  \n" + t({"ddp": "estimate.ddp", "fsdp": "estimate.fsdp"}[self.parallel], world=self.world)
        if self.train_seconds is not None:
            text += "  \n" + t("estimate.training", duration=duration(self.train_seconds), steps=self.steps)
        return text + ("  \n" + t(self.note) if self.note else "")


class Estimator:
    """Caches each model's config (one small JSON read per model name); thread-safe."""

    def __init__(self, configs: dict[str, Any] | None = None) -> None:
        self._configs: dict[str, Any] = dict(configs or {})  # model name -> transformers config
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
                 device: str = "cpu", data: tuple[dict, DataConfig] | None = None, world: int = 1) -> Estimate:
        """``data``: the loaded dataset's length stats (core.data.length_stats) and its DataConfig, for the
        number of steps and the tokens per step of the time estimate. ``world``: the processes (GPUs) the run
        will span; the figures are then per device, with the weights and their training state split over them
        under FSDP2 (core.dist.strategy says whether the run will take it)."""
        seq = min(train.max_len, seq_len or train.max_len)
        run = dry_run(self.model_config(model), method_cfg, seq)  # ValueError names the field
        trainable, total, shape = run.trainable, run.total, run.shape
        check_train(train, run.method)  # a device this machine lacks, a strategy the method cannot take
        virtual = int(getattr(method_cfg, "num_virtual_tokens", 0) or 0) if spec_of(method_cfg).virtual_tokens else 0
        precision = resolve_precision(train.precision, torch.device(device))
        base = 2 if precision == "bf16-mixed" else 4
        state, kept = run.method.memory(trainable, total, base, torch.device(device).type)
        supervised = seq  # a position per token, unless the dataset says how many are trained
        if data is not None and data[0].get("n"):
            supervised = min(seq, data[0]["supervised_tokens"] / data[0]["n"])
        acts = activation_bytes(run.model, shape, train, seq + virtual, supervised, torch.device(device), base)
        est = Estimate(trainable, total, (total - state) * base + state * 4, state * 4, state * 8 + kept, acts,
                       "" if seq_len is not None else "estimate.no_dataset", world=world)
        if world > 1:
            est.parallel = strategy(train.parallel, run.method, trainable, torch.device(device), DistInfo(world_size=world))
        if est.parallel == "fsdp":  # a 1/world shard of each, plus one whole block while it runs
            block = (total - shape.vocab_size * shape.hidden_size) // max(1, shape.num_layers) * 4
            est.weights_bytes = est.weights_bytes // world + block
            est.grads_bytes, est.optimizer_bytes = est.grads_bytes // world, est.optimizer_bytes // world
        if data is not None and data[0].get("n"):
            stats, data_cfg = data
            est.steps = planned_steps(train, train_rows(stats["n"], data_cfg))
            mean = min(train.max_len, stats["mean"]) + virtual
            supervised = min(stats["supervised_tokens"] / stats["n"], mean)
            rows = train.batch_size * train.grad_accum  # a step's rows; each micro-batch runs a shared prefix once
            shared = stats.get("shared_prefix", 0) if shares_prefix(run.method, torch.device(device), world == 1,
                                                                    train) else 0
            call = piece_budget(torch.device(device))[1] if shared else 0  # the prefix's own pass: one more call
            tokens = rows * mean - (rows - train.grad_accum) * shared + train.grad_accum * call
            flops = step_flops(shape, total, trainable, tokens, rows * supervised)
            est.train_seconds = est.steps * flops / (matmul_rate(device, precision) * EFFICIENCY[precision])
        return est


def activation_bytes(model: nn.Module, shape, train: TrainConfig, seq: int, supervised: float, device: torch.device,
                     base: int) -> int:
    """Activation memory of the largest packed row or piece of a batch (see the module docstring); ``model`` is
    the dry run's."""
    cap = piece_budget(device)[0]
    rows = max(1, min(train.batch_size, cap // max(1, seq)))
    positions = min(train.batch_size * seq, max(cap, seq))  # a packed row fills up to the cap, a piece nearly
    d, layers = shape.hidden_size, shape.num_layers
    ff = int(getattr(model.config, "intermediate_size", None) or 4 * d)
    per_position = 6 * d + 2 * shape.kv_dim + 3 * ff + trained_inputs(find_blocks(model)[1][0])
    if attention.grouped(device, torch.bfloat16 if base == 2 else torch.float32, seq):  # its (H, Tq, Tk) probabilities
        per_position += int(getattr(model.config, "num_attention_heads", 0) or 0) * seq
    if train.grad_checkpointing:
        body = positions * (layers * d + per_position) * base
    else:
        body = positions * layers * per_position * base
    head = min(CE_CHUNK, math.ceil(rows * supervised)) * shape.vocab_size * (6 if base == 2 else 4)
    return int(body + head)


def trained_inputs(block: nn.Module) -> int:
    """Entries a position that a block keeps for its trained linear layers: the input of each linear module
    whose weight, or a LoRA / adapter inside it, trains, once per distinct input (q, k and v read the same one:
    one per parent module and width)."""
    widths: dict[tuple[str, int], int] = {}
    counted: list[str] = []
    for name, module in block.named_modules():
        width = getattr(module, "in_features", None) or getattr(module, "nx", None)  # nn.Linear, GPT-2's Conv1D
        if not width or any(name.startswith(c + ".") for c in counted):
            continue  # a LoRA's own linears are part of the layer they wrap
        if any(p.requires_grad for p in module.parameters()):
            counted.append(name)
            widths[(name.rpartition(".")[0], int(width))] = int(width)
    return sum(widths.values())


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


def matmul_rate(device: str, precision: str, windows: int = 5, window_s: float = 0.05) -> float:
    """FLOP/s of a SmolLM2-sized product (512 × 576 by 576 × 1536, through core.linear as the engine's layers run
    it) on ``device`` now: the best of ``windows`` short
    windows, so that a thread pool warming up or a moment's load does not set the estimate (at most once per
    RATE_TTL_S per device and precision)."""
    key = (device, precision)
    if key in _rates and time.monotonic() - _rates[key][0] < RATE_TTL_S:
        return _rates[key][1]
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    a = torch.randn(512, 576, dtype=dtype, device=device)
    w = torch.randn(1536, 576, dtype=dtype, device=device)
    core_linear.linear(a, w)  # warm-up
    best = 0.0
    for _ in range(windows):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < window_s:
            core_linear.linear(a, w)
            if device != "cpu":
                torch.cuda.synchronize()
            n += 1
        best = max(best, n * 2 * 512 * 576 * 1536 / elapsed)
    _rates[key] = (time.monotonic(), best)
    return best
