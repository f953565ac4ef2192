"""fp32 linear layers on the CPU through oneDNN, about twice as fast as torch's default on some CPUs.

torch runs an fp32 ``F.linear`` on the CPU with MKL's sgemm. On an AMD EPYC (Zen 5, AVX-512) MKL took its slower
path: 190-230 GFLOP/s on 2 cores for SmolLM2's shapes, where oneDNN's JIT kernels (the ones torch already uses
for bf16, and inductor for fp32) reached 360-490 GFLOP/s with the same fp32 results (rounding differs, ~1e-6
relative; no bf16 anywhere). A training step is ~80% matrix products, so fp32 training and chat follow.

``linear`` is ``F.linear`` through oneDNN (``torch.ops.mkldnn._linear_pointwise``, which reads ordinary strided
tensors) where ``fast`` says so, with its own backward (dX = dY·W, dW = dYᵀ·X, db = Σ dY, each through oneDNN
too); everything else (half precision, autocast, GPUs, tensor subclasses such as FSDP's DTensor, single rows)
goes to ``F.linear`` unchanged. Decoding gains most: one row through the 49k-wide LM head took 6.6 ms with MKL
and 2.9 ms with oneDNN (greedy chat 26.5 -> 39 tokens/s on that CPU). ``use(model)`` routes a model's ``nn.Linear`` layers through it; the modules stay
``nn.Linear`` with the same parameters and state dict.
"""

from __future__ import annotations

from types import MethodType

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

# oneDNN keeps every product's shape it has compiled (1024 by default). Rows of varying lengths make hundreds of
# them, and with them ~300 MB of a LoRA run's peak on SmolLM2; 64 kept the same speed (read at its first product).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_PLAIN = (Tensor, nn.Parameter)


def fast(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear`` sends this product to oneDNN: fp32 on the CPU outside autocast, plain tensors, not empty."""
    return (
        _OP is not None
        and x.dtype == torch.float32 and weight.dtype == torch.float32
        and x.device.type == "cpu" and weight.device.type == "cpu"
        and type(x) in _PLAIN and type(weight) in _PLAIN
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


if _OP is not None:

    @register_flop_formula(_OP)
    def _flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """What torch's FLOP counter (and so the estimate's test against it) counts for one oneDNN product."""
        return 2 * math.prod(x_shape) * w_shape[0]


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x·weightᵀ (+ bias) by oneDNN; x (..., in), weight (out, in), any strides."""
    return _OP(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return _mm(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dy, weight.t())  # dY·W
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = _mm(dy2.t(), x.reshape(-1, x.shape[-1]).t())  # dYᵀ·X, (out, in)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where ``fast`` says so."""
    if not fast(x, weight) or (bias is not None and (bias.dtype != torch.float32 or type(bias) not in _PLAIN)):
        return F.linear(x, weight, bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _Linear.apply(x, weight, bias) if grad else _mm(x, weight, bias)


def _forward(self: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, self.weight, self.bias)


def use(model: nn.Module) -> None:
    """Route every ``nn.Linear`` of ``model`` through ``linear`` (again after a method adds layers; idempotent)."""
    if _OP is None:
        return
    for m in model.modules():
        if type(m) is nn.Linear and getattr(m.forward, "__func__", None) is not _forward:
            m.forward = MethodType(_forward, m)
