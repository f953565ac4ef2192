"""What both sides of the benchmark share: the cases, the data (tokenised once, identically) and the eval loss."""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.config import DataConfig
from core.data import Example, load_examples, read_rows

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "assets" / "instruction_sample.json"
SEED = 42


@dataclass(frozen=True)
class Case:
    name: str
    method: str                      # our registry name
    knobs: dict = field(default_factory=dict)
    lr: float = 2e-4
    full_examples: int = 0           # 0 = every training example of the sample
    quick_examples: int = 48
    full_epochs: int = 1             # passes of the full-size run (QUICK runs one)
    precision: str = "auto"          # ours' TrainConfig.precision; the peer autocasts to bf16 where it resolves to bf16


CASES = [
    Case("lora-default", "lora", {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}, lr=2e-4, quick_examples=64,
         full_epochs=2),  # 2 × 26 = 52 optimiser steps a side on the CPU
    Case("prompt-tuning", "prompt_tuning", {"num_virtual_tokens": 20, "init": "random"}, lr=3e-2, full_examples=128),
    Case("prefix-tuning", "prefix_tuning", {"num_virtual_tokens": 20, "encoder_hidden": 512}, lr=3e-3, full_examples=128),
    Case("p-tuning", "p_tuning", {"num_virtual_tokens": 20, "encoder_type": "mlp", "encoder_hidden": 128}, lr=3e-3,
         full_examples=128),
]
# Run only when named (--cases): both sides in fp32, to set against lora-default on a CPU or GPU with native bf16
EXTRA_CASES = [
    Case("lora-fp32", "lora", {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}, lr=2e-4, quick_examples=64,
         full_epochs=2, precision="fp32"),
]
CASE_BY_NAME = {c.name: c for c in CASES + EXTRA_CASES}
# The peer's standard settings `make bench` tries, by side name: (group_by_length, attn_implementation). The table
# sets ours against the fastest. Under bf16 autocast on a CPU the peer's SDPA runs its flash kernel in bf16, which is
# slow on short rows (core.attention), so there its eager attention is tried too (bench.__main__.peer_sides).
PEER_SIDES = {"peer": (False, "sdpa"), "peer-grouped": (True, "sdpa"), "peer-grouped-eager": (True, "eager")}
BATCH = 8
MAX_LEN = 512


VAL_COUNT = 32


def write_split(out_dir: Path, n_train: int) -> tuple[Path, Path]:
    """Shuffle the sample's rows with a fixed seed; write the first 32 as val.json and the next n as train.json.
    Both sides read these two files, so they train and evaluate on exactly the same rows."""
    rows = read_rows(SAMPLE)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED)).tolist()
    rows = [rows[i] for i in order]
    val, train = rows[:VAL_COUNT], rows[VAL_COUNT:]
    train = train[:n_train] if n_train else train
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.json").write_text(json.dumps(train), encoding="utf-8")
    (out_dir / "val.json").write_text(json.dumps(val), encoding="utf-8")
    return out_dir / "train.json", out_dir / "val.json"


def encode_file(path: Path, tokenizer) -> list[Example]:
    """Chat-template rendering with prompt tokens masked: the same tokens for both sides."""
    examples, _ = load_examples(DataConfig(path=str(path)), tokenizer, MAX_LEN)
    return examples


def our_batch_order(examples: list[Example], device: torch.device, epochs: int = 1) -> list[int]:
    """The example order of our engine's ``epochs`` epochs: the batches core.train.train draws, flattened.

    The peer reads its rows in this order (sequential sampler), so both sides take the same optimiser steps on the
    same 8 rows; on CPU these batches are uniform random draws, like the Trainer's own RandomSampler."""
    from core.data import LengthGroupedBatches

    batches = LengthGroupedBatches(examples, BATCH, SEED, pad_id=0, group=device.type != "cpu")
    order = []
    for epoch in range(epochs):
        plan = batches.plan(epoch)
        last = epoch == epochs - 1  # only the very last batch of the run may be short
        if any(len(b) != BATCH for b in (plan[:-1] if last else plan)):
            raise RuntimeError("one of our batches is a short one: the peer's sequential batches would not line up")
        order += [i for b in plan for i in b]
    return order


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB.

    VmHWM belongs to this process alone; ru_maxrss would also count the parent it was forked from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


# Dense bf16 peak of the GPUs we expect to meet, for the model-FLOPs utilisation (MFU) of the full GPU mode.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                   "4090": 165e12}


def model_flops(examples: list[Example], n_params: int, num_layers: int, hidden: int) -> float:
    """Useful training FLOPs of one pass over ``examples`` with a frozen base (PEFT): forward 2·N per token plus
    the input-gradient backward 2·N, and causal attention 2·L·d·T² forward, twice that backward, per row."""
    return sum(4 * n_params * len(e.input_ids) + 6 * num_layers * hidden * len(e.input_ids) ** 2 for e in examples)


def mfu(flops: float, wall_s: float) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return flops / wall_s / peak if peak else None


def supervised_tokens(examples: list[Example]) -> int:
    return sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)


def length_histogram(lengths: list[int], bin_width: int = 32, bar: int = 40) -> list[str]:
    """A text histogram of token lengths, one line per non-empty bin: '  64- 95 | ######## 23'."""
    if not lengths:
        return []
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n // bin_width] = counts.get(n // bin_width, 0) + 1
    top = max(counts.values())
    lines = []
    for b in range(min(counts), max(counts) + 1):
        c = counts.get(b, 0)
        lo, hi = b * bin_width, (b + 1) * bin_width - 1
        lines.append(f"{lo:5d}-{hi:4d} | {'#' * max(1 if c else 0, round(bar * c / top)):<{bar}} {c}")
    return lines
