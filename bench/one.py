"""Run one side of one case in a fresh process (so peak memory is that side's alone); print one JSON line.

``--flops`` counts the training run's FLOPs with torch's FLOP counter instead of timing it (the counter slows it
down): the matrix products of both sides. The CPU's flash attention kernel (SDPA) has no formula in torch's
counter, so in fp32 attention is left out of both counts; in bf16 on a CPU our short attention's matmuls
(core.attention) and the peer's eager attention are counted."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import DEFAULT_MODEL
from core.models import load_model

from . import ours, peer
from .common import CASE_BY_NAME, PEER_SIDES, encode_file, mfu, model_flops, write_split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=sorted(CASE_BY_NAME))
    ap.add_argument("--side", required=True, choices=["ours", *PEER_SIDES])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--flops", action="store_true", help="count the training run's FLOPs (the timing is then void)")
    args = ap.parse_args()
    case = CASE_BY_NAME[args.case]
    torch.manual_seed(0)
    # each side loads the model its own way: ours through core (its attention and linear kernels), the peer's
    # through transformers alone
    model, tokenizer = load_model(DEFAULT_MODEL) if args.side == "ours" else peer.plain_model(DEFAULT_MODEL)
    device = next(model.parameters()).device
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = case.quick_examples if args.quick else case.full_examples
        train_file, val_file = write_split(work / "data", n)
        epochs = 1 if args.quick else case.full_epochs
        counter = FlopCounterMode(display=False) if args.flops else None
        if args.side == "ours":
            result = ours.run(case, model, tokenizer, train_file, val_file, work, device, epochs, training=counter)
        else:
            grouped, attn = PEER_SIDES[args.side]
            result = peer.run(case, model, tokenizer, train_file, val_file, work, device, grouped=grouped,
                              epochs=epochs, attn=attn, training=counter)
        if counter is not None:
            result["train_flop"] = counter.get_total_flops()
        if device.type == "cuda":
            flops = model_flops(encode_file(train_file, tokenizer), n_params, cfg.num_hidden_layers, cfg.hidden_size)
            result["mfu"] = mfu(flops, result["wall_s"])
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
