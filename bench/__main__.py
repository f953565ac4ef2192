"""`make bench [QUICK=1]`: every case, ours vs transformers.Trainer + peft, each side in its own process.

Ours runs with the settings a user gets (log_every 1, precision auto). The peer runs on our batches and with its own
group_by_length, and where it trains bf16 on a CPU also with group_by_length and transformers' eager attention
(common.PEER_SIDES, peer_sides); the table compares ours with the fastest. Writes bench/results.json and
prints the token-length histogram of the data, a markdown table of the training cases, one of chat generation
(bench/generation.py, which fails unless greedy tokens are identical) and one of a training step while the studio
chats (bench/contention.py). The machine line lists the CPU's vector and matrix flags (AVX2, AVX-512, AMX).
Without QUICK, lora-default trains on every training row of the sample (more than 30 optimiser steps a side);
QUICK=1 uses fewer examples and shorter replies.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.models import resolve_device, resolve_precision

from .common import CASE_BY_NAME, CASES, PEER_SIDES, SAMPLE, encode_file, length_histogram, write_split

OUT = Path(__file__).parent / "results.json"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import os

    from core.models import cpu_flags

    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4"))))
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()} [{flags}], torch {torch.__version__}"


def run_side(case: str, side: str, quick: bool) -> dict:
    return _run([sys.executable, "-m", "bench.one", "--case", case, "--side", side], quick, f"{case}/{side}")


def _run(cmd: list[str], quick: bool, what: str) -> dict:
    proc = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise RuntimeError(f"{what} failed:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def data_report(quick: bool) -> dict:
    """Token lengths of the instruction sample (chat template, max_len 512) and of the rows each case trains on."""
    from core.models import load_tokenizer

    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        train_file, val_file = write_split(Path(tmp), 0)
        lengths = [len(e.input_ids) for e in encode_file(train_file, tokenizer) + encode_file(val_file, tokenizer)]
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    case = CASE_BY_NAME["lora-default"]
    n = case.quick_examples if quick else case.full_examples
    return {
        "file": SAMPLE.name, "rows": len(lengths), "min": ordered[0], "p50": pick(0.5), "p90": pick(0.9),
        "max": ordered[-1], "mean": sum(lengths) / len(lengths), "lora_default_train_rows": n or len(lengths) - 32,
        "histogram": length_histogram(lengths),
    }


def peer_sides(case) -> list[str]:
    """The peer's settings to try: all of PEER_SIDES where the case runs bf16 on a CPU; elsewhere not the eager
    attention (SDPA's fp32 and GPU kernels are as fast or faster)."""
    device = resolve_device("auto")
    bf16_cpu = device.type == "cpu" and resolve_precision(case.precision, device) == "bf16-mixed"
    return [side for side, (_, attn) in PEER_SIDES.items() if attn != "eager" or bf16_cpu]


def table(results: dict) -> str:
    gpu = any(c["ours"].get("mfu") is not None for c in results["cases"])
    rows = ["| case | ours wall s | peer wall s (random / grouped / grouped eager) | speedup vs peer's best | ours tok/s | peer tok/s "
            "| mem ours/peer MB | mem ratio | eval loss ours / peer | loss delta |" + (" MFU ours / peer |" if gpu else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for c in results["cases"]:
        o, p = c["ours"], c["peer"]
        walls = " / ".join(f"{c['peers'][s]['wall_s']:.1f}" if s in c["peers"] else "-" for s in PEER_SIDES)
        row = (
            f"| {c['name']} | {o['wall_s']:.1f} | {walls} | {c['speedup']:.2f}x | {o['tokens_per_s']:.0f} | "
            f"{p['tokens_per_s']:.0f} | {o['peak_mem_mb']:.0f} / {p['peak_mem_mb']:.0f} | {c['mem_ratio']:.2f} | "
            f"{o['eval_loss']:.4f} / {p['eval_loss']:.4f} | {c['loss_delta_pct']:+.2f}% |"
        )
        if gpu:
            row += f" {100 * (o.get('mfu') or 0):.1f}% / {100 * (p.get('mfu') or 0):.1f}% |"
        rows.append(row)
    return "\n".join(rows)


def generation_table(g: dict) -> str:
    rows = ["| generation (greedy, default model) | time to first token s | tokens/s |", "|---|---|---|"]
    names = {"hf-streamer": "model.generate + TextIteratorStreamer", "ours": "core.generate.stream, base",
             "lora": "core.generate.stream, LoRA unmerged", "lora-merged": "core.generate.stream, LoRA merged"}
    for key, label in names.items():
        rows.append(f"| {label} | {g[key]['ttft_s']:.3f} | {g[key]['tokens_per_s']:.1f} |")
    return "\n".join(rows)


def contention_table(c: dict) -> str:
    rows = [f"| training step while the studio chats ({c['cores']} cores) | step s | slowdown | chat tokens/s |",
            "|---|---|---|---|"]
    for key, label in (("alone", "no chat"), ("shared", "chat, cores split (studio.cores)"),
                       ("naive", "chat, every core on both sides")):
        p = c[key]
        slow = "" if key == "alone" else f"{c[f'slowdown_{key}_pct']:+.0f}%"
        rate = f"{p['chat_tokens_per_s']:.1f}" if p["chat_tokens_per_s"] else "-"
        rows.append(f"| {label} | {p['step_s']:.2f} | {slow} | {rate} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="fewer examples; fits 15 min on 2 CPU cores")
    ap.add_argument("--cases", nargs="*", default=[c.name for c in CASES])
    ap.add_argument("--no-generation", action="store_true", help="skip the chat generation timing")
    ap.add_argument("--no-contention", action="store_true", help="skip chat-while-training (bench/contention.py)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "cases": []}
    data = results["data"] = data_report(args.quick)
    print(f"{data['file']}: {data['rows']} rows, tokens per row min {data['min']} / p50 {data['p50']} / "
          f"p90 {data['p90']} / max {data['max']} (mean {data['mean']:.0f}); lora-default trains on "
          f"{data['lora_default_train_rows']} of them. Token lengths:")
    print("\n".join(data["histogram"]) + "\n", flush=True)
    for name in args.cases:
        ours = run_side(name, "ours", args.quick)
        peers = {side: run_side(name, side, args.quick) for side in peer_sides(CASE_BY_NAME[name])}
        best = min(peers, key=lambda side: peers[side]["wall_s"])  # the peer's best standard setting
        peer = peers[best]
        print(f"{name}: ours {ours['wall_s']:.1f}s, " + ", ".join(f"{s} {r['wall_s']:.1f}s" for s, r in peers.items()),
              flush=True)
        results["cases"].append({
            "name": name, "ours": ours, "peer": peer, "peer_best": best, "peers": peers,
            "speedup": peer["wall_s"] / ours["wall_s"],
            "mem_ratio": ours["peak_mem_mb"] / peer["peak_mem_mb"],
            "loss_delta_pct": 100 * (ours["eval_loss"] - peer["eval_loss"]) / peer["eval_loss"],
        })
        OUT.write_text(json.dumps(results, indent=2))
    if not args.no_generation:
        results["generation"] = _run([sys.executable, "-m", "bench.generation"], args.quick, "generation")
        OUT.write_text(json.dumps(results, indent=2))
    if not args.no_contention:
        results["contention"] = _run([sys.executable, "-m", "bench.contention"], args.quick, "contention")
        OUT.write_text(json.dumps(results, indent=2))
    results["total_s"] = time.perf_counter() - t_start
    OUT.write_text(json.dumps(results, indent=2))
    print(f"\nMachine: {results['machine']} ({results['date']}{', quick' if args.quick else ''}; "
          f"whole benchmark {results['total_s'] / 60:.1f} min)\n")
    print(table(results))
    if "generation" in results:
        print()
        print(generation_table(results["generation"]))
    if "contention" in results:
        print()
        print(contention_table(results["contention"]))


if __name__ == "__main__":
    main()
