"""core.attention: short bf16 attention on the CPU as grouped matmuls gives SDPA's result and gradients (within
bf16 rounding of an fp64 reference), hands every other call to SDPA unchanged, and is what our models run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from core import attention
from tiny import TINY_MODELS, batch, tiny_llama
from test_train import run, run_config, tiny_lm, write_qa


class Module(nn.Module):
    """What transformers' attention functions read of the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def qkv(b: int, h: int, kv: int, tq: int, tk: int, dtype=torch.bfloat16, seed: int = 0, key_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    make = lambda heads, t, s=1.0: (torch.randn(b, heads, t, 16, generator=g) * s).to(dtype).requires_grad_()  # noqa: E731
    return make(h, tq), make(kv, tk, key_scale), make(kv, tk)


def causal_mask(b: int, tq: int, tk: int, lengths: list[int] | None = None, left: bool = False) -> torch.Tensor:
    """SDPA's boolean mask: query i (the last tq of tk positions) sees keys <= its position, minus padding."""
    pos = torch.arange(tk)
    mask = (pos[None, :] <= pos[tk - tq :, None])[None, None].repeat(b, 1, 1, 1)
    for row, n in enumerate(lengths or []):  # n real tokens; the others are padding, on the left or the right
        if left:
            mask[row, :, :, : tk - n] = False
        else:
            mask[row, :, :, n:] = False
    return mask


def reference(q, k, v, mask):
    """fp64 attention through PyTorch's math kernel: what both bf16 paths approximate."""
    groups = q.shape[1] // k.shape[1]
    k64, v64 = (t.detach().double().repeat_interleave(groups, 1).requires_grad_() for t in (k, v))
    q64 = q.detach().double().requires_grad_()
    if mask is None:
        out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask)
    return out.transpose(1, 2), q64, k64, v64


CASES = {  # (rows, query heads, key/value heads, queries, keys, real tokens a row or None, key scale)
    "causal, GQA": (2, 4, 2, 12, 12, None, 1.0),
    "causal, one head per key": (2, 3, 3, 12, 12, None, 1.0),
    "right padding": (3, 4, 2, 12, 12, [12, 7, 3], 1.0),
    "after a shared prefix": (3, 4, 2, 9, 14, [14, 10, 12], 1.0),  # the rows' keys start with 5 prefix positions
    # scores of ~±40, as a trained prefix's keys give: scores rounded to bf16 (±0.25 there) miss the reference
    "large scores": (2, 4, 2, 12, 12, None, 40.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_short_bf16_attention_equals_the_fp64_reference_like_sdpa(case):
    b, h, kv, tq, tk, lengths, key_scale = CASES[case]
    mask = None if lengths is None else causal_mask(b, tq, tk, lengths)
    module = Module(h // kv)
    q, k, v = qkv(b, h, kv, tq, tk, key_scale=key_scale)
    assert attention._short_cpu(module, q, k, mask, 0.0, {})  # this call runs the grouped matmuls
    out, weights = attention.attention(module, q, k, v, mask, scaling=16**-0.5)
    assert weights is None and out.shape == (b, tq, h, 16) and out.dtype == torch.bfloat16
    ref, q64, k64, v64 = reference(q, k, v, mask)
    sdpa = sdpa_attention_forward(module, *(t.detach().requires_grad_() for t in (q, k, v)), mask, scaling=16**-0.5)[0]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    # (B, Tq, 1, 1): queries that see at least one key (all of them here: right padding keeps the causal keys)
    real = mask.any(-1).permute(0, 2, 1)[..., None] if mask is not None else torch.ones(1, 1, 1, 1)
    ours_err = ((out.double() - ref).abs() * real).max()
    sdpa_err = ((sdpa.double() - ref).abs() * real).max()
    assert ours_err < 0.02 and ours_err <= 2 * sdpa_err + 1e-3

    (out.float() * grad * real).sum().backward()
    (ref * grad.double() * real).sum().backward()
    groups = h // kv
    fold = lambda t: t.grad.view(b, kv, groups, *t.shape[2:]).sum(2)  # noqa: E731 - repeated heads back onto theirs
    for mine, theirs in ((q.grad, q64.grad), (k.grad, fold(k64)), (v.grad, fold(v64))):
        assert mine is not None
        assert (mine.double() - theirs).abs().max() < 0.05 * max(1.0, theirs.abs().max().item())


def test_under_the_runs_autocast_the_scores_stay_fp32():
    """Training runs under bf16 autocast, which would turn the fp32 score matmul back into bf16; with the large
    scores of a trained prefix that loses the attention pattern. Keys in fp32 (a prefix cache) are taken too."""
    b, h, kv, t = 2, 4, 2, 12
    q, k, v = qkv(b, h, kv, t, t, key_scale=40.0)
    ref = reference(q, k, v, None)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.attention(Module(2), q, k.detach().float(), v, None)[0]
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 0.02


def test_a_query_whose_keys_are_all_masked_gets_no_nan():
    """Left padding (batched generation): the padded queries of a row see no key at all."""
    b, h, kv, t = 2, 4, 2, 10
    q, k, v = qkv(b, h, kv, t, t)
    mask = causal_mask(b, t, t, [10, 6], left=True)
    assert not mask[1, 0, 0].any()
    out, _ = attention.attention(Module(2), q, k, v, mask)
    assert torch.isfinite(out).all()
    ref = reference(q, k, v, mask)[0]
    assert (out[1, 4:].double() - ref[1, 4:]).abs().max() < 0.02  # the real positions are exact


@pytest.mark.parametrize("why, b, tq, tk, dtype", [
    ("fp32 (SDPA is as fast there)", 2, 12, 12, torch.float32),
    ("longer than SHORT_KEYS", 1, 8, attention.SHORT_KEYS + 8, torch.bfloat16),
    ("one query: decoding", 2, 1, 12, torch.bfloat16),
])
def test_everything_else_is_sdpa_unchanged(why, b, tq, tk, dtype):
    module = Module(2)
    q, k, v = qkv(b, 4, 2, tq, tk, dtype=dtype)
    mask = causal_mask(b, tq, tk)
    assert not attention._short_cpu(module, q, k, mask, 0.0, {})
    ours = attention.attention(module, q, k, v, mask)[0]
    assert torch.equal(ours, sdpa_attention_forward(module, q, k, v, mask)[0])


def test_softcap_a_sliding_window_and_dropout_go_to_sdpa():
    module = Module(2)
    q, k, v = qkv(1, 4, 2, 8, 8)
    assert not attention._short_cpu(module, q, k, None, 0.0, {"sliding_window": 4})
    assert not attention._short_cpu(module, q, k, None, 0.0, {"softcap": 30.0})
    assert not attention._short_cpu(module, q, k, None, 0.1, {})  # attention dropout: SDPA draws it


@pytest.mark.parametrize("layout", list(TINY_MODELS))
def test_a_bf16_model_with_padding_gives_sdpa_logits(layout, monkeypatch):
    model = TINY_MODELS[layout]().to(torch.bfloat16)
    ids, mask = batch(b=3, t=12)
    calls = []
    monkeypatch.setattr(attention._GroupedAttention, "apply", spy(attention._GroupedAttention.apply, calls))
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask).logits.float()
        assert not calls
        attention.use(model)
        assert model.config._attn_implementation == attention.NAME
        ours = model(input_ids=ids, attention_mask=mask).logits.float()
    assert len(calls) == model.config.num_hidden_layers  # every layer ran the grouped matmuls
    real = mask.bool()[..., None]
    assert ((ours - sdpa).abs() * real).max() < 0.05 * sdpa.abs().max()


def spy(fn, calls: list):
    def wrapped(*args):
        calls.append(args[0].shape)
        return fn(*args)
    return wrapped


def test_training_switches_the_model_and_saved_configs_do_not_name_it(tmp_path, monkeypatch):
    """A model passed to train() runs our attention (under bf16-mixed, forward and backward), and a saved model
    folder stays loadable by any transformers (its config.json does not name an implementation only this process
    registered)."""
    model = tiny_lm()
    assert model.config._attn_implementation == "sdpa"
    calls = []
    monkeypatch.setattr(attention._GroupedAttention, "apply", spy(attention._GroupedAttention.apply, calls))
    events = run(run_config(write_qa(tmp_path / "qa.json", n=4), max_steps=1, precision="bf16-mixed"),
                 tmp_path / "run", model=model)
    assert events[-1]["status"] == "completed" and calls
    assert model.config._attn_implementation == attention.NAME
    tiny = tiny_llama()
    attention.use(tiny)
    tiny.save_pretrained(tmp_path / "saved")
    assert attention.NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def packed_reference_mask(lengths: list[int], prefix: int) -> torch.Tensor:
    """Block-diagonal causal mask of a packed row after ``prefix`` shared keys: each sequence sees the prefix and
    its own keys up to itself, never another sequence."""
    t = sum(lengths)
    mask = torch.zeros(t, prefix + t, dtype=torch.bool)
    mask[:, :prefix] = True
    s = 0
    for n in lengths:
        mask[s : s + n, prefix + s : prefix + s + n] = torch.ones(n, n, dtype=torch.bool).tril()
        s += n
    return mask[None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 5])
def test_a_packed_row_attends_within_each_sequence(dtype, prefix, monkeypatch):
    """A packed CPU row (positions restarting at each sequence, after an optional shared prefix) runs one
    sequence at a time and equals the block-diagonal fp64 reference, values and gradients; the mask
    transformers passes (plain causal, as it builds with a prefix cache) is not what decides."""
    lengths = [7, 3, 9, 1]
    t = sum(lengths)
    q, k, v = qkv(1, 4, 2, t, prefix + t, dtype=dtype, seed=3)
    pos = torch.cat([torch.arange(prefix, prefix + n) for n in lengths])[None]
    calls = []
    real = attention._per_sequence
    monkeypatch.setattr(attention, "_per_sequence", lambda *a: calls.append(a[4]) or real(*a))
    out, _ = attention.attention(Module(2), q, k, v, causal_mask(1, t, prefix + t), scaling=16**-0.5,
                                 position_ids=pos)
    assert calls == [[(0, 7), (7, 10), (10, 19), (19, 20)]]
    want, q64, k64, v64 = reference(q, k, v, packed_reference_mask(lengths, prefix))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol * 4)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    out.backward(dy.to(dtype))
    want.backward(dy.double())
    for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad.view(1, 2, 2, -1, 16).sum(2)),
                     (v.grad, v64.grad.view(1, 2, 2, -1, 16).sum(2))):
        assert (got.double() - ref).abs().max() <= tol * 4 * ref.abs().max()


@pytest.mark.parametrize("why,pos", [
    ("one sequence", torch.arange(12)[None]),
    ("a batch of rows", None),
    ("decoding: one query", torch.tensor([[11]])),
])
def test_only_packed_cpu_rows_are_split(why, pos):
    q = torch.randn(1 if why != "a batch of rows" else 2, 4, 1 if why.startswith("decoding") else 12, 16)
    assert attention.packed_segments(q, pos) is None
    assert attention.packed_segments(torch.randn(1, 4, 5, 16), torch.tensor([[0, 1, 2, 0, 1]])) == [(0, 3), (3, 5)]
