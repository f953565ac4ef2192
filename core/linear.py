"""fp32 linear layers on x86 CPUs through oneDNN, faster than torch's default, most of all on AVX-512.

torch runs an fp32 ``F.linear`` on the CPU with MKL's sgemm. On a 2-core AMD EPYC (Zen 5, AVX-512) that reached
190-230 GFLOP/s for SmolLM2's shapes, where oneDNN's JIT kernels (the ones torch already uses for bf16, and
inductor for fp32) reached 360-490 GFLOP/s with fp32 results (rounding differs, ~1e-6 relative; no bf16
anywhere). A training step is ~80% matrix products, so fp32 training follows, and decoding most of all: one row
through the 49k-wide LM head took 6.6 ms with MKL and 2.9 ms with oneDNN. With every library held to AVX2 on the
same machine, oneDNN's products ran at 195-235 GFLOP/s against MKL's 170-205, a LoRA step took 6% less time, and
the head's one row 2.5 ms against 6.8 ms. So this runs wherever torch's CPU capability is AVX2 or AVX-512
(``ENABLED``); elsewhere (older x86, ARM), or with ``PEFT_STUDIO_ONEDNN_LINEAR=0``, ``F.linear`` keeps every
product.

``linear`` is ``F.linear`` through oneDNN (``torch.ops.mkldnn._linear_pointwise``, which reads ordinary strided
inputs) where ``fast`` says so, with its own backward (dX = dY·W, dW = dYᵀ·X, db = Σ dY, the products through
oneDNN too); everything else (half precision, autocast, GPUs, tensor subclasses, odd shapes) goes to
``F.linear`` unchanged. ``use(model)`` routes a model's ``nn.Linear`` layers through it; the modules stay
``nn.Linear`` with the same parameters and state dict.
"""

from __future__ import annotations

import math
import os
from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
# PEFT_STUDIO_ONEDNN_LINEAR=0 keeps F.linear everywhere (the AVX2 figures come from a machine held to AVX2)
ENABLED = (_OP is not None and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
           and os.environ.get("PEFT_STUDIO_ONEDNN_LINEAR", "1") != "0")
_PLAIN = (Tensor, nn.Parameter)
# oneDNN keeps every product shape it has compiled (1024 by default). Rows of varying lengths make hundreds of
# them, and with them ~300 MB of a LoRA run's peak on SmolLM2; 64 kept the same speed. oneDNN reads it at its first
# product in the process, whichever runs first (the studio's rate measurement, a bf16 matmul), so it is set here,
# on import, unless the user set it.
if ENABLED:
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


def fast(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``linear`` sends this product to oneDNN: fp32 on the CPU outside autocast, plain tensors, a 2-D
    non-empty weight, a contiguous 1-D bias (oneDNN reads it as one), a non-empty input."""
    return (
        ENABLED
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and type(t) in _PLAIN
                for t in (x, weight) + (() if bias is None else (bias,)))
        and weight.dim() == 2 and weight.numel() > 0 and x.numel() > 0
        and (bias is None or (bias.shape == weight.shape[:1] and bias.is_contiguous()))
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
    @once_differentiable  # no second derivatives (they would silently be zero)
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
    if not fast(x, weight, bias):
        return F.linear(x, weight, bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _Linear.apply(x, weight, bias) if grad else _mm(x, weight, bias)


def forward(self: nn.Linear, x: Tensor) -> Tensor:
    """``nn.Linear.forward`` through ``linear`` (named ``forward``: a pickled model comes back with the plain one)."""
    return linear(x, self.weight, self.bias)


def use(model: nn.Module) -> None:
    """Route every ``nn.Linear`` of ``model`` through ``linear`` where ``ENABLED`` (again after a method adds
    layers: idempotent). A module whose ``forward`` something else has replaced keeps it."""
    if not ENABLED:
        return
    for m in model.modules():
        if type(m) is nn.Linear and "forward" not in m.__dict__:
            m.forward = MethodType(forward, m)
