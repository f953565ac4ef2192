"""FFN backward time: FAR's reconfigured FFNs (learner units only) against training the whole FFN.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 .venv/bin/python -m bench.far_backward [--batch 4] [--tokens 128] [--repeats 7]

On the default model (core.models.load_model()), one batch of random token ids runs through the model once to
capture every block's FFN input x_l (B, T, d). Then, for each side, every FFN alone runs forward and the timer
covers only ``y.backward(g)`` with a fixed random output gradient g (B, T, d), summed over the blocks, with x_l
requiring grad (as inside a real backward pass, which needs the input gradient too):

    whole FFN   original modules, every FFN weight requires grad: dW for all h units of each linear
    FAR         the same FFN split by FAR (retention as given, default 0.1): dW only for the k learner units

Median over ``repeats`` (after one warm-up). The learner selection is units 0..k−1 (``apply`` without priming):
the cost does not depend on which units learn. Prints the CPU flags that matter for the matmul kernels.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch

from core.blocks import find_blocks
from core.methods import build_method, method_config
from core.models import load_model


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    wanted = [f for f in sorted(flags) if f.startswith(("avx2", "avx512", "amx", "fma"))]
    return " ".join(wanted) or "none of avx2/avx512/amx"


def ffn_inputs(model, batch: int, tokens: int) -> list[torch.Tensor]:
    """Each block's FFN input on one batch of random tokens: [(B, T, d)] * L."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g)
    captured: list[torch.Tensor] = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
             for b in find_blocks(model)[1]]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return captured


def backward_seconds(mlps, inputs, grads) -> float:
    """Σ over blocks of the time of y.backward(g) for y = mlp(x), x requiring grad."""
    total = 0.0
    for mlp, x, g in zip(mlps, inputs, grads):
        x = x.clone().requires_grad_(True)
        y = mlp(x)
        t0 = time.perf_counter()
        y.backward(g)
        total += time.perf_counter() - t0
        for p in mlp.parameters():
            p.grad = None
    return total


def median_time(mlps, inputs, grads, repeats: int) -> float:
    backward_seconds(mlps, inputs, grads)  # warm-up
    return statistics.median(backward_seconds(mlps, inputs, grads) for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--retention", type=float, default=0.1)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, _ = load_model(device="cpu", dtype=torch.float32)
    inputs = ffn_inputs(model, args.batch, args.tokens)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g) for x in inputs]
    blocks = find_blocks(model)[1]
    mlps = [b.mlp for b in blocks]

    for mlp in mlps:  # whole FFN trains
        mlp.requires_grad_(True)
    whole = median_time(mlps, inputs, grads, args.repeats)
    ffn_params = sum(p.numel() for m in mlps for p in m.parameters())
    model.requires_grad_(False)

    method = build_method(method_config("far", {"retention": args.retention}))
    method.apply(model)  # split FFNs, learner parts trainable
    far = median_time(mlps, inputs, grads, args.repeats)
    trainable = method.parameter_counts(model)[0]

    print(f"model: {model.config._name_or_path or type(model).__name__}, {len(blocks)} FFNs, batch {args.batch} x "
          f"{args.tokens} tokens, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"cpu flags: {cpu_flags()}")
    print(f"whole FFN trains: {ffn_params:,} weights, backward {whole * 1e3:.1f} ms (median of {args.repeats})")
    print(f"FAR retention {args.retention}: {trainable:,} weights, backward {far * 1e3:.1f} ms "
          f"(median of {args.repeats})")
    print(f"FAR / whole: {far / whole:.2f}")


if __name__ == "__main__":
    main()
