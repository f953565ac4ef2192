"""Side (a): our engine, driven exactly as the CLI and the studio drive it (core.train.train)."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from core.checkpoint import load_adapter
from core.config import DEFAULT_MODEL, DataConfig, RunConfig, TrainConfig, method_config
from core.data import LengthGroupedBatches
from core.forward import supervised_loss
from core.models import load_model
from core.train import train

from .common import BATCH, MAX_LEN, SEED, Case, encode_file, peak_memory_mb, supervised_tokens


@torch.no_grad()
def eval_loss(model, method, examples, pad_id: int, device) -> float:
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for b in LengthGroupedBatches(examples, BATCH, seed=SEED, pad_id=pad_id, shuffle=False).epoch(0):
        s, n = supervised_loss(model, method, b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device))
        total += s.float()
        count += n
    return float(total / count)


def run(case: Case, model, tokenizer, train_file: Path, val_file: Path, work: Path, device, epochs: int = 1,
        training: AbstractContextManager | None = None) -> dict:
    """``training``: a context the training run alone goes through (bench.one's FLOP counter), not the eval."""
    cfg = RunConfig(
        model="(preloaded)",
        method=method_config(case.method, case.knobs),
        train=TrainConfig(lr=case.lr, scheduler="linear", warmup_steps=0, epochs=epochs, batch_size=BATCH, max_len=MAX_LEN,
                          seed=SEED, precision=case.precision),  # everything else as a user gets it: log_every 1
        data=DataConfig(path=str(train_file), val_fraction=0.0),
    )
    events = []
    t0 = time.perf_counter()
    with training or nullcontext():
        for ev in train(cfg, work / "ours", model=model, tokenizer=tokenizer):
            events.append(ev)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    mem = peak_memory_mb(device)  # before evaluation, which loads a second copy of the base
    end = events[-1]
    if end.get("type") != "end" or end.get("status") != "completed":
        raise RuntimeError(f"our run did not complete: {end}")
    # evaluate what a user gets: the saved adapter, loaded onto a fresh base model
    base, _ = load_model(DEFAULT_MODEL, device=device)
    method = load_adapter(base, work / "ours" / "adapter")
    start = next(e for e in events if e.get("type") == "start")
    train_examples = encode_file(train_file, tokenizer)
    return {
        "wall_s": wall,
        "tokens_per_s": supervised_tokens(train_examples) / wall,
        "peak_mem_mb": mem,
        "eval_loss": eval_loss(base, method, encode_file(val_file, tokenizer), tokenizer.pad_token_id, device),
        "trainable": start.get("trainable"),
    }
