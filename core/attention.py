"""The attention our engine runs: PyTorch's SDPA, except where the CPU's bf16 kernel is slow.

On the CPU, SDPA's fused (flash) kernel in bf16 is tuned for long sequences. On the short rows a chat dataset
has, its backward pass is the slowest op of a training step (30% of the bench's LoRA step). Measured on a 2-core
AVX512-BF16 CPU with SmolLM2-135M's heads (9 query heads sharing 3 key/value heads, head size 64), causal,
forward + backward, in ms:

    rows x query = keys   SDPA    _GroupedAttention
      8 x  64              6.9      3.2
      8 x 114             13.6      7.7
      4 x 200             10.9     11.9
      2 x 384             15.7     21.6

(in fp32 the two are about even, so fp32 keeps SDPA.) ``attention`` therefore computes bf16/fp16 attention on
the CPU over at most ``SHORT_KEYS`` keys itself and leaves everything else to transformers' SDPA. Its numerics
are a flash kernel's: scores and softmax in fp32, the probabilities rounded to bf16 for the product with V, and
the backward's dP in fp32. (Scores rounded to bf16 were faster still, but a prefix-tuning run diverged with them:
a trained prefix's keys grow, and bf16 scores then lose the attention pattern.) It keeps one (B, H, Tq, Tk) bf16
tensor per layer for the backward pass: at most 2.8 MiB a layer for a 1024-position piece
(core.forward.piece_budget). The query heads that share a key/value head are stacked as one (G·Tq, d) matrix
against that head's keys, so the shared heads are never copied.

A packed row on the CPU (core.forward.packed: sequences back to back, positions restarting at each, read from
the ``position_ids`` transformers hands to attention) runs one sequence at a time, each attending causally to its
own keys after a shared prefix's (``_per_sequence``): no block-diagonal mask, which would rule out the causal
kernels and cost the row's length squared.

``use(model)`` switches a loaded transformers model to it; the masks it gets are SDPA's (boolean, or None for
plain causal attention), so both paths see the same inputs and give the same result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "peft_studio"  # the attn_implementation name it is registered under
SHORT_KEYS = 160  # the longest key length computed by the grouped matmuls (SDPA is as fast from ~200)


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention signature: query (B, H, Tq, d), key/value (B, KV, Tk, d) -> ((B, Tq, H, d), None)."""
    segments = packed_segments(query, kwargs.get("position_ids"))
    if segments is not None:
        return _per_sequence(module, query, key, value, segments, dropout, scaling, kwargs), None
    if not _short_cpu(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, tq, d = query.shape
    if attention_mask is None:  # plain causal attention over as many keys as queries (_short_cpu checks)
        attention_mask = torch.ones(tq, tq, dtype=torch.bool, device=query.device).tril()[None, None]
    # a prefix's keys may come in fp32 (a trained prompt cache): computed in the query's dtype, as autocast would
    out = _GroupedAttention.apply(query, key.to(query.dtype), value.to(query.dtype), attention_mask,
                                  d**-0.5 if scaling is None else scaling)
    return out.transpose(1, 2).contiguous(), None


def packed_segments(query: Tensor, position_ids: Tensor | None) -> list[tuple[int, int]] | None:
    """The (start, end) query positions of each sequence of a packed CPU row (core.forward.packed: positions
    restart at every sequence), or None for anything else (a batch of rows, one sequence, a GPU, one query)."""
    if query.device.type != "cpu" or query.shape[0] != 1 or query.shape[2] < 2 or position_ids is None:
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() != query.shape[2]:
        return None
    starts = [0] + (torch.nonzero(pos[1:] - pos[:-1] != 1).reshape(-1) + 1).tolist()
    if len(starts) == 1:
        return None
    return list(zip(starts, starts[1:] + [pos.numel()]))


def _per_sequence(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, segments: list[tuple[int, int]],
                  dropout: float, scaling: float | None, kwargs: dict) -> Tensor:
    """Attention of a packed CPU row, one sequence at a time: each attends causally to its own keys, after the
    keys of a shared prefix (core.forward.SharedPrefix; the first Tk - Tq keys) if there is one. The same result
    as a block-diagonal mask over the whole row, at the cost of the sequences' own lengths, not the row's squared,
    and with the causal kernels (SDPA's, or ``_GroupedAttention``) that a mask would rule out."""
    p = key.shape[2] - query.shape[2]
    rest = {k: v for k, v in kwargs.items() if k != "position_ids"}
    outs = []
    for s, e in segments:
        k, v = key[:, :, p + s : p + e], value[:, :, p + s : p + e]
        mask = None  # plain causal over its own keys
        if p:  # every query sees the whole prefix, then its own keys up to itself
            k, v = torch.cat([key[:, :, :p], k], 2), torch.cat([value[:, :, :p], v], 2)
            mask = torch.ones(e - s, p + e - s, dtype=torch.bool, device=query.device).tril(p)[None, None]
        outs.append(attention(module, query[:, :, s:e], k, v, mask, dropout, scaling, **rest)[0])
    return torch.cat(outs, 1)


class _GroupedAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale + mask)·v for one (G·Tq, d) block of queries per key/value head.

    The scores and their softmax are fp32 (as in a flash kernel: bf16 scores lose the attention pattern once keys
    grow large, as a trained prefix's do); the probabilities are kept in bf16, the one (B, H, Tq, Tk) tensor saved
    for the backward, which computes dS = P ⊙ (dP − Σ dP ⊙ P) from them in fp32."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        b, h, tq, d = q.shape
        kv, tk = k.shape[1], k.shape[2]
        g = h // kv
        qg = q.reshape(b, kv, g * tq, d)  # the G query heads of key/value head j are heads j·G .. j·G+G-1
        with torch.autocast(q.device.type, enabled=False):  # fp32 matmuls stay fp32 under the run's autocast
            scores = torch.matmul(qg.float().mul_(scale), k.float().transpose(-1, -2)).view(b, kv, g, tq, tk)
            # the lowest finite value, not -inf: a query whose keys are all masked (left padding) gets no NaN
            scores.masked_fill_(~mask[:, :, None], torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1).to(q.dtype).view(b, kv, g * tq, tk)
            out = torch.matmul(probs, v)
        ctx.save_for_backward(qg, k, v, probs, out)
        ctx.scale = scale
        return out.view(b, h, tq, d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qg, k, v, probs, out = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            go = grad_out.reshape(out.shape).to(v.dtype)
            grad_v = torch.matmul(probs.transpose(-1, -2), go)
            # dS = P ⊙ (dP − Σ_j P·dP), and Σ_j P_ij·dP_ij = dO_i · O_i (dP = dO·Vᵀ, O = P·V): no (Tq, Tk) product
            grad_s = torch.matmul(go.float(), v.float().transpose(-1, -2))
            grad_s.sub_((go.float() * out.float()).sum(-1, keepdim=True)).mul_(probs).mul_(ctx.scale)
            grad_s = grad_s.to(qg.dtype)
            grad_q = torch.matmul(grad_s, k).view(grad_out.shape)
            grad_k = torch.matmul(grad_s.transpose(-1, -2), qg)
        return grad_q, grad_k, grad_v, None, None


def grouped(device: torch.device, dtype: torch.dtype, keys: int) -> bool:
    """Whether attention over ``keys`` keys in ``dtype`` on ``device`` runs as grouped matmuls (else SDPA), which
    keep one (B, H, Tq, Tk) tensor of ``dtype`` for the backward pass (studio.estimate counts it)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and keys <= SHORT_KEYS


def _short_cpu(module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, dropout: float,
               kwargs: dict) -> bool:
    """Whether ``attention`` computes this call itself (else SDPA does): short half-precision attention on the
    CPU (``grouped``), causal with a boolean mask or none, and nothing the grouped form does not do (dropout,
    softcap, sliding window, a position bias, returned weights)."""
    if not grouped(query.device, query.dtype, key.shape[2]) or dropout > 0.0:
        return False
    if any(kwargs.get(k) is not None for k in ("softcap", "sliding_window", "position_bias")):
        return False
    if kwargs.get("output_attentions") or query.shape[1] % key.shape[1]:
        return False
    tq, tk = query.shape[2], key.shape[2]
    if tq < 2:  # one query (decoding): SDPA is already a matrix-vector product
        return False
    if mask is None:  # SDPA reads None as causal (query i sees keys <= i) when the module is causal
        return tq == tk and getattr(module, "is_causal", True) and kwargs.get("is_causal") is not False
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use(model: nn.Module) -> None:
    """Run ``model``'s attention through ``attention`` (a transformers model using the attention interface;
    other models keep theirs)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)


def runs(model: nn.Module) -> bool:
    """Whether ``model``'s attention is ``attention`` (``use`` switched it)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


# Model families whose every layer is full attention and whose attention functions receive the position_ids, so
# a packed CPU row is split into its sequences (tests/test_forward.py trains each). Others keep length-tight
# pieces: a family that drops the position_ids on the way (GPTBigCode, Persimmon, ...) would let a sequence attend
# to the ones before it after a shared prefix, and sliding windows, convolutions and state-space layers cross
# the sequences of a row.
PACKABLE = ("llama", "qwen2", "gpt2")


def splits_packed_rows(model: nn.Module) -> bool:
    """Whether ``model`` runs ``attention`` and is a family (PACKABLE) where it splits every packed CPU row."""
    cfg = getattr(model, "config", None)
    full = all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"])
    return (runs(model) and getattr(cfg, "model_type", None) in PACKABLE and full
            and not getattr(cfg, "use_sliding_window", False))
