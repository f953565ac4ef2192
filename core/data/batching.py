"""Stage 6, batching: examples in, padded tensor batches out.

``split`` takes the examples and gives (train, val), deterministic for the seed. ``collate`` takes a list of
examples and gives one right-padded ``Batch`` of (B, T) tensors. ``LengthGroupedBatches`` takes the examples
and gives each epoch's batches, grouped by length so little compute goes to padding.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .render import IGNORE, Example


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: Tensor  # (B, T) long, 0 on padding
    labels: Tensor  # (B, T) long, IGNORE on prompt and padding

    def n_supervised(self) -> int:
        """Tokens that are predicted: labels[:, 1:] != IGNORE, the same shift as core.forward.supervised_loss."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def split(
    examples: list[Example], val_fraction: float, val_count: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val), deterministic for the seed; both keep the original order. Train keeps at least one example.

    val_count > 0 holds out exactly that many; otherwise round(val_fraction · n), at least 1 when the fraction
    is positive and there are two or more examples.
    """
    n = len(examples)
    n_val = val_size(n, val_fraction, val_count)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val



def val_size(n: int, val_fraction: float, val_count: int) -> int:
    """How many of ``n`` examples ``split`` holds out."""
    if val_count > 0:
        n_val = val_count
    elif val_fraction > 0:
        n_val = max(1, round(val_fraction * n))
    else:
        n_val = 0
    return max(0, min(n_val, n - 1))


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example: pad_id in input_ids, 0 in attention_mask, IGNORE in labels."""
    if not examples:
        raise ValueError("collate needs at least one example")
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[b, :n] = 1
    return Batch(ids, mask, labels)


class LengthGroupedBatches:
    """Batches of similar-length examples, padded only to their own longest member.

    Each epoch: shuffle the examples with Random(seed, epoch), cut the order into mega-batches of
    ``batch_size · MEGA`` examples, sort each mega-batch by length and cut it into batches, then shuffle the
    batch order, putting the batch with the longest example first (an out-of-memory shows at step 1, not late).
    Deterministic for (seed, epoch). Only the last batch of an epoch can be smaller than batch_size.
    With shuffle=False (evaluation) the examples are sorted by length once and the order never changes.
    With group=False every batch is a uniformly random draw (its rows sorted by length, longest batch still
    first): the training loop uses that on CPU, where core.forward.pieces removes the padding anyway and
    length-homogeneous batches would cost quality (they are often topic-homogeneous too).
    """

    MEGA = 50

    def __init__(
        self, examples: list[Example], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
        group: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size} is invalid: must be >= 1")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.group = group
        self.lengths = [len(e.input_ids) for e in examples]

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def plan(self, epoch: int) -> list[list[int]]:
        """The example indices of every batch of the epoch, in order."""
        n, bs = len(self.examples), self.batch_size
        if n == 0:
            return []
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: (-self.lengths[i], i))
            return [order[i : i + bs] for i in range(0, n, bs)]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(n))
        rng.shuffle(order)
        mega = bs * (self.MEGA if self.group else 1)
        batches: list[list[int]] = []
        for m in range(0, n, mega):
            group = sorted(order[m : m + mega], key=lambda i: -self.lengths[i])
            batches += [group[i : i + bs] for i in range(0, len(group), bs)]
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        first = batches.pop(longest)
        rng.shuffle(batches)
        return [first, *batches]

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of one epoch; ``skip`` drops the first batches, to resume mid-epoch."""
        for idx in self.plan(epoch)[skip:]:
            yield collate([self.examples[i] for i in idx], self.pad_id)

    def padding_waste(self, epoch: int = 0) -> float:
        """Fraction of the (B, T) positions of an epoch that are padding."""
        real = padded = 0
        for idx in self.plan(epoch):
            lens = [self.lengths[i] for i in idx]
            real += sum(lens)
            padded += max(lens) * len(lens)
        return 1 - real / padded if padded else 0.0
