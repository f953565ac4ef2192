"""core.linear: fp32 linear layers on the CPU through oneDNN give F.linear's values and gradients (within fp32
rounding of an fp64 reference), hand every other call to F.linear, and are what our models and training run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import linear
from core.config import method_config
from core.forward import head_cross_entropy
from test_train import run, run_config, tiny_lm, write_qa
from tiny import batch

pytestmark = pytest.mark.skipif(linear._OP is None, reason="this torch has no oneDNN")


def close_to_fp64(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within fp32 rounding of an fp64 result: 1e-5 of its largest value (bf16 would be ~1e-2)."""
    return bool((ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max())


@pytest.fixture
def calls(monkeypatch):
    """The products oneDNN ran, as (rows, in, out, the weight's storage, whether the weight trains); on any CPU
    (ENABLED is AVX2 and AVX-512 only)."""
    seen = []
    op = linear._OP

    def spy(x, w, *rest):
        seen.append((x.numel() // x.shape[-1], x.shape[-1], w.shape[0], w.data_ptr(), w.requires_grad))
        return op(x, w, *rest)

    monkeypatch.setattr(linear, "_OP", spy)
    monkeypatch.setattr(linear, "ENABLED", True)
    return seen


SHAPES = {  # x shape, (out, in), bias, x transposed (strided) or not
    "rows": ((40, 24), (16, 24), True, False),
    "batch of rows": ((3, 7, 24), (16, 24), False, False),
    "one row (decoding)": ((1, 1, 24), (50, 24), True, False),
    "a vector": ((24,), (16, 24), True, False),
    "strided input": ((24, 40), (16, 24), True, True),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_values_and_gradients_equal_the_fp64_reference(case, calls):
    x_shape, w_shape, with_bias, transposed = SHAPES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g)
    x = (x.T if transposed else x).requires_grad_()
    w = torch.randn(*w_shape, generator=g).requires_grad_()
    b = torch.randn(w_shape[0], generator=g).requires_grad_() if with_bias else None
    y = linear.linear(x, w, b)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if with_bias else None
    y64 = F.linear(x64, w64, b64)
    y64.backward(dy.double())
    assert y.shape == y64.shape and y.dtype == torch.float32
    assert close_to_fp64(y, y64)
    assert close_to_fp64(x.grad, x64.grad) and close_to_fp64(w.grad, w64.grad)
    if with_bias:
        assert close_to_fp64(b.grad, b64.grad)
    assert len(calls) == 3  # forward, dX, dW: all three through oneDNN


@pytest.mark.parametrize("trains", ["bias only (BitFit)", "weight, not the input (full fine-tuning's first layer)"])
def test_only_the_gradients_asked_for_are_computed_and_right(trains, calls):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    (b if trains.startswith("bias") else w).requires_grad_()
    y = linear.linear(x, w, b)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    if trains.startswith("bias"):
        assert close_to_fp64(b.grad, dy.double().sum(0)) and w.grad is None and len(calls) == 1
    else:
        assert close_to_fp64(w.grad, dy.double().T @ x.double()) and b.grad is None and len(calls) == 2


def test_a_frozen_weight_gets_no_gradient_and_keeps_no_input(calls):
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(4, 8)
    y = linear.linear(x, w)
    assert y.grad_fn.saved_tensors[0] is None  # X is not kept when W needs no gradient
    y.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(5, 8))
    assert w.grad is None and len(calls) == 2  # forward and dX only


WHY_NOT = {
    "bf16": lambda: (torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)),
    "fp64": lambda: (torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)),
    "mixed dtypes": lambda: (torch.randn(4, 8), torch.randn(3, 8, dtype=torch.bfloat16)),
    "no rows": lambda: (torch.randn(0, 8), torch.randn(3, 8)),
    "no output features": lambda: (torch.randn(4, 8), torch.randn(0, 8)),
    "a 1-D weight": lambda: (torch.randn(4, 8), torch.randn(8)),
    "a strided bias": lambda: (torch.randn(4, 8), torch.randn(3, 8), torch.randn(6)[::2]),
    "a scalar bias": lambda: (torch.randn(4, 8), torch.randn(3, 8), torch.tensor(0.5)),
}


@pytest.mark.parametrize("why", list(WHY_NOT))
def test_everything_else_is_f_linear(why, calls):
    x, w, *b = WHY_NOT[why]()
    b = b[0] if b else None
    assert not linear.fast(x, w, b)
    if x.dtype == w.dtype:
        assert torch.equal(linear.linear(x, w, b), F.linear(x, w, b))
    assert not calls


def test_nothing_is_routed_where_not_enabled(monkeypatch, calls):
    monkeypatch.setattr(linear, "ENABLED", False)
    model = tiny_lm()
    linear.use(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not linear.fast(torch.randn(4, 8), torch.randn(3, 8))


def test_under_autocast_the_product_is_left_to_autocast(calls):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear.linear(x, w)
    assert y.dtype == torch.bfloat16 and not calls


def test_use_routes_a_models_linears_and_keeps_its_modules_and_state(calls):
    model = tiny_lm()
    ids, mask = batch(b=2, t=10)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    keys = list(model.state_dict())
    linear.use(model)
    linear.use(model)  # idempotent
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert len(calls) == n_linear  # every nn.Linear (q, k, v, o, gate, up, down a layer, and the head) ran oneDNN
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)


def test_use_leaves_a_forward_something_else_replaced(calls):
    model = tiny_lm()
    q = model.model.layers[0].self_attn.q_proj
    q.forward = lambda x: torch.zeros(*x.shape[:-1], q.out_features)  # e.g. another library's hook
    linear.use(model)
    assert q(torch.randn(2, 32)).abs().sum() == 0 and not calls


def test_the_fused_head_cross_entropy_runs_onednn_and_equals_the_plain_loss(calls):
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=True)
    h = torch.randn(30, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (30,), generator=g)
    loss = head_cross_entropy(head, h, t, chunk=8)
    loss.backward()
    assert len(calls) == 4 * 3  # 4 chunks: logits, dH, dW
    h2 = h.detach().double().requires_grad_()
    w2, b2 = head.weight.detach().double().requires_grad_(), head.bias.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, w2, b2), t, reduction="sum")
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert close_to_fp64(h.grad, h2.grad) and close_to_fp64(head.weight.grad, w2.grad)
    assert close_to_fp64(head.bias.grad, b2.grad)


@pytest.mark.parametrize("method", ["lora", "diff_pruning", "far"])
def test_fp32_training_runs_its_products_through_onednn(tmp_path, calls, method):
    """A model passed to train() in fp32: the base's layers and the layers the method trains (LoRA's added ones,
    DiffPruning's and FAR's own products) run oneDNN."""
    model = tiny_lm()
    cfg = run_config(write_qa(tmp_path / "qa.json", n=4), method_config(method, {}), max_steps=1, precision="fp32")
    events = run(cfg, tmp_path / "run", model=model)
    assert events[-1]["status"] == "completed"
    assert model.lm_head.weight.data_ptr() in {c[3] for c in calls}  # the base's head (no method adapts it)
    assert any(c[4] for c in calls)  # a weight that trains
    if method == "lora":
        assert model.model.layers[0].self_attn.q_proj.lora_A.weight.data_ptr() in {c[3] for c in calls}


@pytest.mark.parametrize("user_value", [None, "7"])
def test_importing_core_caps_onednns_shape_cache_unless_the_user_set_it(user_value):
    """Set on import, before any product of the process (oneDNN reads it once); where the routing is on (ENABLED)."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if user_value:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = user_value
    code = "import os, core.models, core.linear as L; print(L.ENABLED, os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    enabled = out[0] == "True"
    assert out[1] == (user_value or ("64" if enabled else "None"))


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_routing_is_on_where_torch_runs_avx2_or_avx512(capability):
    """oneDNN's fp32 products beat MKL's with AVX2 too (6% of a LoRA step, 2.7x on the head's one decoding row,
    measured with every library held to AVX2); without AVX2 (old x86, ARM) F.linear keeps them."""
    code = "import torch, core.linear as L; print(torch.backends.cpu.get_cpu_capability(), L.ENABLED)"

    def enabled(**env) -> tuple[str, str]:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, **env}
        return tuple(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split())

    got, on = enabled()
    if got != capability.upper():
        pytest.skip(f"this CPU runs {got}, not {capability}")
    assert on == str(capability != "default")
    assert enabled(PEFT_STUDIO_ONEDNN_LINEAR="0")[1] == "False"  # the user's way out
