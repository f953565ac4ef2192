"""The attention our engine runs: PyTorch's SDPA, except where the CPU's bf16 kernel is slow.

On the CPU, SDPA's fused (flash) kernel in bf16 is tuned for long sequences. On the short rows a chat dataset
has, its backward pass is the slowest op of a training step. Measured on a 2-core AVX512-BF16 CPU with
SmolLM2-135M's heads (9 query heads sharing 3 key/value heads, head size 64), forward + backward, in ms:

    rows x query = keys   SDPA    grouped matmuls
      8 x 114             12.4      3.4
      4 x 256             13.4      6.5
      2 x 384             12.6     10.1
      2 x 512             21.6     17.4

(in fp32 the two are about even, so fp32 keeps SDPA.) ``attention`` therefore computes bf16/fp16 attention on
the CPU with two batched matmuls and a softmax (accumulated in fp32, stored in bf16), up to ``SHORT_KEYS``
keys, and leaves everything else to transformers' SDPA. It saves one (B, H, Tq, Tk) bf16 tensor per layer for
the backward pass: at most 9 MiB a layer for a 1024-position piece (core.forward.piece_budget). The grouped form needs no copies of the shared key/value heads: the query heads of one
key/value head are stacked as one (G·T, d) matrix against that head's keys.

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
SHORT_KEYS = 512  # the longest key length computed by the grouped matmuls (still 1.2x faster at 512)


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention signature: query (B, H, Tq, d), key/value (B, KV, Tk, d) -> ((B, Tq, H, d), None)."""
    if not _short_cpu(module, query, key, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, tq, d = query.shape
    kv, tk = key.shape[1], key.shape[2]
    g = h // kv
    scale = d**-0.5 if scaling is None else scaling
    # the G query heads of key/value head j are heads j·G .. j·G+G-1: one (G·Tq, d) matrix against its keys
    scores = torch.matmul((query * scale).reshape(b, kv, g * tq, d), key.transpose(-1, -2)).view(b, kv, g, tq, tk)
    if attention_mask is None:  # plain causal attention over as many keys as queries (_short_cpu checks)
        attention_mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril()[None, None]
    # the lowest finite value, not -inf: a query whose keys are all masked (left padding) gets no NaN
    scores.masked_fill_(~attention_mask[:, :, None], torch.finfo(scores.dtype).min)  # the matmul's backward needs
    probs = torch.softmax(scores, dim=-1)  # neither scores nor its output; the CPU kernel sums in fp32
    if dropout > 0.0:
        probs = nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.view(b, kv, g * tq, tk), value).view(b, h, tq, d)
    return out.transpose(1, 2).contiguous(), None


def grouped(device: torch.device, dtype: torch.dtype, keys: int) -> bool:
    """Whether attention over ``keys`` keys in ``dtype`` on ``device`` runs as grouped matmuls (else SDPA), which
    keep one (B, H, Tq, Tk) tensor of ``dtype`` for the backward pass (studio.estimate counts it)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and keys <= SHORT_KEYS


def _short_cpu(module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kwargs: dict) -> bool:
    """Whether ``attention`` computes this call itself (else SDPA does): short half-precision attention on the
    CPU (``grouped``), causal with a boolean mask or none, and nothing the grouped form does not do (softcap,
    sliding window, a position bias, returned weights)."""
    if not grouped(query.device, query.dtype, key.shape[2]):
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
