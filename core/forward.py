"""The forward pass shared by training, evaluation and tests: any method, logits or supervised loss only.

Where the time and memory of a fine-tuning step go, and what this module does about it:

* The LM head (vocab 49k for SmolLM2) runs only on the positions whose next token is supervised, instead of on
  every position of every padded sequence.
* The cross-entropy runs in chunks of ``CE_CHUNK`` positions and, when a gradient is needed, computes the
  gradient of its input in the same pass (``softmax - onehot``, then ``@ W``), so at most one (chunk, V) block
  of logits lives at a time, never the whole (N, V) logits, their log-softmax and their gradient.
* ``attention_mask=None`` means "no padding, or right padding only". Then causal attention alone is exact at
  every real position (a real token never looks right, where the padding is), so the model gets no mask: SDPA
  takes its causal kernel, with no (B, 1, T, T) mask and no copies of the grouped K/V heads. Our batches are
  always right-padded (core.data.collate), so the training loop passes None.
* ``packed`` puts a batch's sequences back to back in rows with no padding at all, positions restarting at each
  sequence. On CUDA transformers turns that into attention within each sequence (flash-attention's varlen
  kernel, or SDPA with a block-diagonal causal mask). On the CPU, where SDPA's fast kernel is causal-only,
  core.attention runs a packed row one sequence at a time with the causal kernels, after the shared prefix's keys
  (next but one) when there is one: with no padding and one call per row instead of one per piece, a LoRA step
  took 8-10% less time than as pieces.
* ``pieces`` cuts a batch into length-sorted row groups (at most ``max_tokens`` padded positions each, chosen to
  minimise padding plus a per-call overhead), each trimmed to its own longest row; summing the losses of the
  pieces (backward after each) gives the gradient of the whole batch, with less padding and activation memory
  capped by the budget, not by batch · longest row. (8 rows of up to 371 tokens padded together kept ~5 GB of
  fp32 activations alive for SmolLM2-135M; as pieces of <= 1024 positions, ~1.5 GB.) The CPU uses them where it
  cannot pack: methods that prepend virtual tokens to every sequence, models whose attention is not ours.
* ``SharedPrefix``: rows rendered with a chat template all start with the same system prompt and user-turn
  header (24 of the instruction sample's ~115 tokens a row). That prefix runs once per micro-batch, as one row,
  and every row attends to its keys and values, with the same loss and gradients as running it in every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from .linear import linear
from .methods.base import Method
from .methods.virtual_tokens import cache_kwarg, output_cache

IGNORE = -100  # label of a position that is not trained (prompt tokens, padding)
CE_CHUNK = 512  # positions per block of the chunked cross-entropy: (512, 49152) fp32 logits = 96 MiB


def piece_budget(device: torch.device) -> tuple[int, int]:
    """(max positions per piece or packed row, overhead of one extra piece in positions) for ``pieces``/``packed``.

    CPU: a forward+backward costs about one unit per padded position plus ~40-60 per call (measured on SmolLM2),
    so small pieces pay; the cap also bounds activation memory. GPU: a call costs thousands of positions' worth
    of launches, so a batch is cut only when it exceeds the cap."""
    return (1024, 64) if device.type == "cpu" else (16384, 4096)


def hidden_states(
    model: nn.Module, method: Method | None, input_ids: Tensor, attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None, prefix: SharedPrefix | None = None,
) -> Tensor:
    """Last hidden states (B, T, d) aligned with ``input_ids``; virtual tokens of prompt methods are stripped.

    ``attention_mask`` None: no padding, or right padding only (see the module docstring). ``position_ids``: a
    packed row (``packed``), positions restarting for each sequence; attention stays within each.
    ``prefix``: the rows continue this shared prefix (``SharedPrefix``), whose keys and values they attend to."""
    if method is None:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    elif method.num_virtual_tokens and attention_mask is None:  # they extend the mask over their positions
        kwargs = method.prepare_inputs(model, input_ids, torch.ones_like(input_ids))
    else:
        kwargs = method.prepare_inputs(model, input_ids, attention_mask)
    if position_ids is not None:  # transformers reads the sequence starts from them (packed-sequence support)
        kwargs["position_ids"] = position_ids
    if prefix is not None:  # positions and the causal mask continue after it (transformers reads its length)
        kwargs[cache_kwarg(model)] = prefix.cache(model, input_ids.shape[0])
    h = model.base_model(**kwargs, use_cache=False).last_hidden_state
    # prompt-style methods prepend virtual positions to the sequence; prefix-style ones put them in the cache
    return h[:, h.shape[1] - input_ids.shape[1] :]


def logits(model: nn.Module, method: Method | None, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Full logits (B, T, V), for tests and evaluation."""
    return model.get_output_embeddings()(hidden_states(model, method, input_ids, attention_mask))


def supervised_loss(
    model: nn.Module, method: Method | None, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
    position_ids: Tensor | None = None, prefix: SharedPrefix | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum of token cross-entropies, number of supervised tokens) for a batch, or a packed row (``packed``).

    labels[b, t] is the token to predict at position t (already aligned with input_ids, like HF: the shift by
    one happens here), or IGNORE. Only positions with a label reach the LM head.
    """
    h = hidden_states(model, method, input_ids, attention_mask, position_ids, prefix)  # (B, T, d)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    h = h[:, :-1][keep]  # (N, d) supervised positions only
    return head_cross_entropy(model.get_output_embeddings(), h, targets[keep]), keep.sum()


def head_cross_entropy(head: nn.Module, h: Tensor, targets: Tensor, chunk: int = CE_CHUNK) -> Tensor:
    """sum_i CE(head(h_i), targets_i) for h (N, d), in fp32, without materialising all (N, V) logits."""
    if type(head) is not nn.Linear:  # a wrapped head (e.g. adapted by a method): the plain computation
        return F.cross_entropy(head(h).float(), targets, reduction="sum")
    params = [p for p in (head.weight, head.bias) if p is not None]
    if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in params)):
        return _FusedHeadCE.apply(h, head.weight, head.bias, targets, chunk)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        z = linear(h[s : s + chunk], head.weight, head.bias).float()
        total = total + F.cross_entropy(z, targets[s : s + chunk], reduction="sum")
    return total


class _FusedHeadCE(torch.autograd.Function):
    """Chunked LM head + cross-entropy that computes its gradients in the forward pass.

    For each chunk of rows: z = h·Wᵀ + b (fp32), loss += logsumexp(z) - z[target], g = softmax(z) - onehot (all in
    the one (c, V) block of z),
    dh = g·W, dW += gᵀ·h, db += Σg. Only dh (N, d) (and dW, db when the head trains) are kept for backward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            z = linear(hc, weight, bias).float()  # (c, V): the one block of logits, worked on in place
            z.sub_(z.amax(dim=-1, keepdim=True))  # shifted: exp cannot overflow
            picked = z.gather(1, tc[:, None]).squeeze(1)
            sums = z.exp_().sum(dim=-1)
            total += (sums.log() - picked).sum()  # logsumexp(z) - z[target], the shift cancels
            g = z.div_(sums[:, None])  # softmax (torch.logsumexp would allocate a second (c, V) block)
            g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
            if need_h:
                grad_h[s : s + chunk] = linear(g.to(weight.dtype), weight.t()).to(h.dtype)
            if need_w:
                grad_w += linear(g.T, hc.float().T)
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else (grad_w * scale).to(w_dtype),
            None if grad_b is None else (grad_b * scale).to(b_dtype),
            None,
            None,
        )


def pieces(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, max_tokens: int, overhead: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """Cut a right-padded batch into (input_ids, labels) pieces, each trimmed to its own longest row.

    Rows are sorted by length and split into consecutive groups minimising Σ (rows · longest row + overhead)
    (dynamic programming; a group stays within ``max_tokens`` padded positions unless it is a single row).
    The pieces stay right-padded: run them with ``attention_mask=None``. Call on CPU tensors (reads lengths)."""
    lengths = attention_mask.sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    lens = [max(1, lengths[i]) for i in order]  # descending: the first row of a group is its longest
    n = len(lens)
    cost, cut = [0] + [None] * n, [0] * (n + 1)  # cost[j]: best for rows[:j]; cut[j]: start of the last group
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            if j - i > 1 and (j - i) * lens[i] > max_tokens:
                break
            c = cost[i] + (j - i) * lens[i] + overhead
            if cost[j] is None or c < cost[j]:
                cost[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    if len(groups) == 1 and lens[0] == input_ids.shape[1]:
        return [(input_ids, labels)]  # already tight: no copy
    out = []
    for g in reversed(groups):
        rows, t = torch.tensor(g), max(1, lengths[g[0]])
        out.append((input_ids[rows, :t], labels[rows, :t]))
    return out


def packed(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, max_tokens: int, start: int = 0
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Padding-free packing: a right-padded batch as rows of (1, n) (input_ids, labels, position_ids), each the
    real tokens of consecutive sequences (at most ``max_tokens``, unless one sequence is longer).

    position_ids restart (at ``start``, 0 by default) at every sequence, which is how transformers finds the sequences of a packed row
    (flash-attention's varlen kernel, or SDPA with a block-diagonal causal mask), so no token attends to another
    sequence, and rotary positions are those of the sequence alone. Each sequence's first label becomes IGNORE:
    in a packed row it would be the target of the previous sequence's last token, and in the batch it is never a
    target. The summed loss and its gradient equal the padded batch's. ``start``: the first position of every
    sequence, k when the rows continue a shared prefix of k tokens (``SharedPrefix``). Call on CPU tensors."""
    lengths = attention_mask.sum(1).tolist()
    rows, out, size = [], [], 0

    def flush() -> None:
        ids = torch.cat([input_ids[r, :n] for r, n in rows])[None]
        lab = torch.cat([torch.cat([labels.new_full((1,), IGNORE), labels[r, 1:n]]) for r, n in rows])[None]
        pos = torch.cat([torch.arange(start, start + n) for _, n in rows])[None]
        out.append((ids, lab, pos))

    for r, n in enumerate(lengths):
        if n == 0:
            continue
        if rows and size + n > max_tokens:
            flush()
            rows, size = [], 0
        rows.append((r, n))
        size += n
    if rows:
        flush()
    return out


PREFIX_MIN = 8  # the shortest shared prefix worth a pass of its own


def shared_prefix(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> int:
    """How many leading tokens all rows of a right-padded batch have in common, with no target among them nor
    right after them (the chat template's system prompt and the user turn's header, ~20% of a short chat row).
    0 for a single row, or a prefix under PREFIX_MIN. Every row keeps at least one token after it. CPU tensors."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0).int().cumprod(0).sum()  # leading positions where all rows agree
    untrained = (labels == IGNORE).all(0).int().cumprod(0).sum()  # leading positions that are never a target
    k = min(int(same), int(untrained) - 1, int(attention_mask.sum(1).min()) - 1)
    return k if k >= PREFIX_MIN else 0


class SharedPrefix:
    """A prefix that every row of a micro-batch starts with, run once instead of once per row.

    ``SharedPrefix(model, method, ids)`` runs the (1, k) prefix and keeps each layer's keys and values; the rows'
    remaining tokens then run with ``prefix=`` (``hidden_states``), attending to those keys and values broadcast
    over the rows, as if the prefix were in every row. The rows see detached copies, so the batch can run as
    several pieces with a backward each: their gradients collect on the copies, and ``backward`` then sends the
    sum through the prefix's own graph once. The prefix positions are never targets (``shared_prefix``), so
    the loss and its gradient are the unshared batch's, and the prefix costs one row of compute instead of B.
    (Dropout inside the prefix draws one mask for all rows instead of one per row.)"""

    def __init__(self, model: nn.Module, method: Method | None, input_ids: Tensor):
        kwargs = method.prepare_inputs(model, input_ids, None) if method is not None else {"input_ids": input_ids}
        kwargs["attention_mask"] = None
        cache = output_cache(model.base_model(**kwargs, use_cache=True))
        self.states = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        self.leaves = [t.detach().requires_grad_(t.requires_grad) for t in self.states]

    def cache(self, model: nn.Module, rows: int) -> DynamicCache:
        """A fresh cache holding the prefix for ``rows`` rows (a forward appends the rows' own keys to it)."""
        kv = [t.expand(rows, -1, -1, -1) for t in self.leaves]
        return DynamicCache(ddp_cache_data=list(zip(kv[0::2], kv[1::2])), config=model.config)

    def backward(self) -> None:
        """Send the gradient the rows left on the prefix's keys and values through the prefix (once)."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self.states, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
