"""The forward pass shared by training, evaluation and tests: any method, logits or supervised loss only.

The loss is computed where it is needed and nowhere else: the LM head (vocab 49k for SmolLM2) runs only on the
positions whose next token is supervised, instead of on every position of every padded sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .methods.base import Method

IGNORE = -100  # label of a position that is not trained (prompt tokens, padding)


def hidden_states(model: nn.Module, method: Method | None, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Last hidden states (B, T, d) aligned with ``input_ids``; virtual tokens of prompt methods are stripped."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if method is None:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    else:
        kwargs = method.prepare_inputs(model, input_ids, attention_mask)
    h = model.base_model(**kwargs, use_cache=False).last_hidden_state
    # prompt-style methods prepend virtual positions to the sequence; prefix-style ones put them in the cache
    return h[:, h.shape[1] - input_ids.shape[1] :]


def logits(model: nn.Module, method: Method | None, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Full logits (B, T, V), for tests and evaluation."""
    return model.get_output_embeddings()(hidden_states(model, method, input_ids, attention_mask))


def supervised_loss(
    model: nn.Module, method: Method | None, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """(sum of token cross-entropies, number of supervised tokens) for a batch.

    labels[b, t] is the token to predict at position t (already aligned with input_ids, like HF: the shift by
    one happens here), or IGNORE. Only positions with a label reach the LM head.
    """
    h = hidden_states(model, method, input_ids, attention_mask)  # (B, T, d)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    h = h[:, :-1][keep]  # (N, d) supervised positions only
    head = model.get_output_embeddings()
    logits_ = head(h).float()  # (N, V)
    loss_sum = F.cross_entropy(logits_, targets[keep], reduction="sum")
    return loss_sum, keep.sum()
