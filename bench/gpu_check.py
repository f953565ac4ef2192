"""One device check on a lent GPU (an H200), run by ``bash bench/gpu_check.sh`` with $OUT set.

No weights, no downloads, no gradio / datasets / gguf: every model is built from a config with random weights
(bench/gpu_assets holds SmolLM2-135M-Instruct's config and tokenizer only). Parts, each in its own process with
its own timeout, printing progress as they go:

    setup    a cache folder whose "default model" is a random SmolLM2-135M-shaped Llama (so core.models'
             load_tokenizer/load_model and the tests' fixtures work offline); versions and the GPU
    methods  every registered method (core.methods.specs()), 20 steps of core.train.train on that model with
             assets/identity_sample.json: loss first/last, supervised tokens/s, peak CUDA memory, failures
    compare  ours (core.train.train) vs transformers.Trainer + peft (bf16 autocast, SDPA, length-grouped
             batches) on a random ~1.07B Llama (hidden 2048, 16 layers, GQA 32/8 heads, ff 8192, vocab
             49152, tied), LoRA and full fine-tuning, one process per side: supervised tokens/s over the
             steps after warm-up, peak CUDA memory, MFU = 6·N·tokens/s ÷ 989e12 (H200 SXM dense bf16,
             datasheet; KINDS.md measured ~790e12 on an 8192³ bf16 matmul here)
    tests    a pytest selection of the engine tests with CUDA visible (no studio / gradio / datasets modules)

Writes $OUT/gpu_check.md (tables), $OUT/gpu_check.json (every number), $OUT/gpu_check.log (all output) and
$OUT/pytest.txt. ``--dry`` runs the same code on a CPU with tiny models and 2 steps, to test it end to end.
"""

from __future__ import annotations

import sys

# The GPU image has none of these; hide them here too, so a dry run on a machine that has them proves nothing
# in this check needs them (transformers asks importlib.util.find_spec, which answers None for a None entry).
HIDDEN = ("gradio", "gradio_client", "datasets", "gguf")
for _name in HIDDEN:
    sys.modules.setdefault(_name, None)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "gpu_assets" / "SmolLM2-135M-Instruct"
IDENTITY = ROOT / "assets" / "identity_sample.json"
INSTRUCTION = ROOT / "assets" / "instruction_sample.json"
PEAK_FLOPS = 989e12  # H200 SXM dense bf16, datasheet (no sparsity)
SEED = 42

# Seconds each part may take at most (GPU run); the whole check also stops at BUDGET_S (tests get what is left).
CAPS = {"setup": 60, "methods": 130, "compare": 75, "tests": 170}
BUDGET_S = 470
TESTS_RESERVE_S = 110  # the parts before the tests stop early enough to leave them this much
DRY_CAPS = {"setup": 120, "methods": 600, "compare": 300, "tests": 600}

TESTS_GPU = ["tests/test_forward.py", "tests/test_generate.py", "tests/test_lora.py", "tests/test_prompt_methods.py",
             "tests/test_train.py", "tests/test_full.py", "tests/test_freeze.py", "tests/test_bitfit.py",
             "tests/test_fishmask.py", "tests/test_adapter.py", "tests/test_schedules.py"]
TESTS_DRY = ["tests/test_forward.py"]


def say(*parts) -> None:
    print(*parts, flush=True)


def hide_code() -> str:
    return f"import sys\nfor m in {HIDDEN!r}: sys.modules.setdefault(m, None)\n"


# ---------------------------------------------------------------------------------------------------------------
# Model shapes


def smol_config(dry: bool):
    """SmolLM2-135M's own config (bench/gpu_assets); for --dry a 2-layer, 64-wide one with the same vocab."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ASSETS)
    if dry:
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 64, 128, 2
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    return cfg


def llama_1b_config(dry: bool):
    """A Llama-3.2-1B-like layout on SmolLM2's vocabulary: d=2048, 16 blocks, 32 query / 8 KV heads of 64, SwiGLU
    ff 8192, tied embeddings. N = 49152·2048 + 16·(2·2048² + 2·2048·512 + 3·2048·8192 + 2·2048) + 2048
    ≈ 1.07e9 parameters. --dry: d=64, 2 blocks."""
    from transformers import LlamaConfig

    smol = smol_config(False)
    shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64)
    if dry:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
    return LlamaConfig(vocab_size=smol.vocab_size, max_position_embeddings=2048, tie_word_embeddings=True,
                       bos_token_id=smol.bos_token_id, eos_token_id=smol.eos_token_id, pad_token_id=smol.pad_token_id,
                       rms_norm_eps=1e-5, **shape)


def build_random(cfg, device, dtype):
    """A model of ``cfg`` with transformers' own random init, built directly on ``device`` in ``dtype``; seeded."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model


def device_of(dry: bool):
    import torch

    if dry:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --dry on a machine without a GPU")
    return torch.device("cuda")


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device) -> float:
    import torch

    from bench.common import peak_rss_mb

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


# ---------------------------------------------------------------------------------------------------------------
# Part: setup


def part_setup(args) -> dict:
    import torch
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available()}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError as e:
        info["peft"] = f"missing: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    say("versions:", json.dumps(info))
    target = Path(args.work) / "cache" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True, exist_ok=True)
    for f in ASSETS.iterdir():
        shutil.copy(f, target / f.name)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(target)
    except Exception as e:  # noqa: BLE001 - an older transformers may not know the v5 tokenizer class name
        say(f"tokenizer did not load as saved ({type(e).__name__}: {e}); retrying as PreTrainedTokenizerFast")
        tc = json.loads((target / "tokenizer_config.json").read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        (target / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        info["tokenizer_fallback"] = True
    t0 = time.perf_counter()
    model = build_random(smol_config(args.dry), "cpu", torch.float32)  # saved fp32, like the real cached copy
    model.save_pretrained(target)
    info["default_model_params"] = sum(p.numel() for p in model.parameters())
    say(f"random SmolLM2-shaped default model ({info['default_model_params'] / 1e6:.1f}M params) saved to {target} "
        f"in {time.perf_counter() - t0:.1f}s")
    os.environ["PEFT_STUDIO_CACHE"] = str(Path(args.work) / "cache")
    from core.models import load_model

    m, tok = load_model("default")
    info["default_model_loads"] = f"{type(m).__name__} on {next(m.parameters()).device}, {next(m.parameters()).dtype}"
    info["chat_template"] = bool(getattr(tok, "chat_template", None))
    say("core.models.load_model('default'):", info["default_model_loads"], "chat template:", info["chat_template"])
    import core.generate  # noqa: F401 - the whole engine imports without gradio / datasets / gguf
    import core.train  # noqa: F401
    import core.__main__  # noqa: F401

    info["core_imports_without"] = list(HIDDEN)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Part: methods


def part_methods(args) -> dict:
    """Every registered method: ``steps`` optimiser steps of core.train.train, as the CLI runs it (log_every 1)."""
    import gc

    import torch

    from core.config import DataConfig, RunConfig, TrainConfig
    from core.methods import method_config, specs
    from core.models import load_model
    from core.train import train

    device = device_of(args.dry)
    steps = 2 if args.dry else 20
    results_file = Path(args.work) / "methods.partial.json"
    rows = []
    for name, spec in specs().items():
        say(f"-- {name}: {steps} steps, lr {spec.lr:g}")
        row = {"method": name, "lr": spec.lr, "steps": steps}
        model = None
        try:
            reset_peak(device)
            model, tok = load_model("default", device=device)
            base_dtype = next(model.parameters()).dtype
            cfg = RunConfig(
                model="default", method=method_config(name, {}),
                train=TrainConfig(lr=spec.lr, scheduler="constant", max_steps=steps, batch_size=8, max_len=512,
                                  seed=SEED, log_every=1, device=device.type),
                data=DataConfig(path=str(IDENTITY), val_fraction=0.0),
            )
            t0 = time.perf_counter()
            events = list(train(cfg, Path(args.work) / "runs" / name, model=model, tokenizer=tok))
            row["wall_s"] = round(time.perf_counter() - t0, 2)
            row["peak_mem_mb"] = round(peak_mb(device), 1)
            start = next((e for e in events if e["type"] == "start"), {})
            step_ev = [e for e in events if e["type"] == "step"]
            end = events[-1]
            row.update(status=end.get("status"), reason=end.get("reason"), trainable=start.get("trainable"),
                       total_params=start.get("total_params"), base_dtype=str(base_dtype).replace("torch.", ""))
            if step_ev:
                row["loss_first"], row["loss_last"] = step_ev[0]["loss"], step_ev[-1]["loss"]
                row["tokens_per_s"] = round(steady_tokens_per_s(step_ev, skip=min(3, len(step_ev) - 1)), 1)
            say(f"   {row.get('status')}: loss {row.get('loss_first', float('nan')):.3f} -> "
                f"{row.get('loss_last', float('nan')):.3f}, {row.get('tokens_per_s', 0):.0f} sup tok/s, "
                f"peak {row['peak_mem_mb']:.0f} MB, {row['wall_s']:.1f}s")
        except Exception as e:  # noqa: BLE001 - one method's failure is a result, not the end of the part
            row.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            say(f"   ERROR {row['reason']}\n{row['traceback']}")
        rows.append(row)
        results_file.write_text(json.dumps(rows, indent=1))  # what is done survives a timeout of the part
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": str(device), "data": IDENTITY.name, "batch_size": 8, "rows": rows}


def steady_tokens_per_s(step_events: list[dict], skip: int) -> float:
    """Supervised tokens per second over the step events after the first ``skip`` (warm-up). Each event's
    tokens_per_s covers the time since the previous event, so its tokens are tokens_per_s · Δelapsed_s."""
    prev = step_events[skip - 1]["elapsed_s"] if skip else 0.0
    tokens = seconds = 0.0
    for ev in step_events[skip:]:
        dt = ev["elapsed_s"] - prev
        tokens += ev["tokens_per_s"] * dt
        seconds += dt
        prev = ev["elapsed_s"]
    return tokens / seconds if seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Part: compare (one side of one case per process)

LORA_KNOBS = {"r": 16, "alpha": 32.0, "dropout": 0.0,
              "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
COMPARE = {"lora": {"method": "lora", "lr": 2e-4}, "full": {"method": "full", "lr": 2e-5}}


def compare_plan(dry: bool) -> dict:
    """Steps and the timing window: steps (warm, total]; both sides log every ``log_every`` steps."""
    if dry:
        return {"batch": 4, "max_len": 256, "steps": 2, "warm": 1, "log_every": 1}
    return {"batch": 16, "max_len": 512, "steps": 40, "warm": 10, "log_every": 5}


def part_compare(args) -> dict:
    import torch

    from bench.common import encode_file
    from core.models import load_tokenizer

    device = device_of(args.dry)
    plan = compare_plan(args.dry)
    tok = load_tokenizer("default")
    examples = encode_file(INSTRUCTION, tok)
    sup = sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
    inp = sum(len(e.input_ids) for e in examples)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    # ours: the base as load_model gives it (bf16 on CUDA); the engine keeps trainable tensors in fp32.
    # peer LoRA: bf16 base, peft's fp32 adapters, Trainer bf16 autocast. peer full: fp32 weights (the same fp32
    # master weights ours trains) under the Trainer's bf16 autocast.
    if args.side == "ours" or args.case == "lora":
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = torch.float32
    reset_peak(device)
    model = build_random(llama_1b_config(args.dry), device, dtype)
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{args.case}/{args.side}: {n_params / 1e9:.3f}B params in {dtype}, {len(examples)} rows "
        f"({sup} supervised / {inp} input tokens), batch {plan['batch']}, {plan['steps']} steps, "
        f"timed steps {plan['warm'] + 1}..{plan['steps']}")
    run = compare_ours if args.side == "ours" else compare_peer
    res = run(args, model, tok, device, plan)
    res.update(case=args.case, side=args.side, n_params=n_params, base_dtype=str(dtype).replace("torch.", ""),
               batch=plan["batch"], steps=plan["steps"], timed_steps=plan["steps"] - plan["warm"],
               input_per_supervised=inp / sup)
    if device.type == "cuda":
        res["mfu"] = 6 * n_params * res["tokens_per_s"] / PEAK_FLOPS
    say(f"{args.case}/{args.side}: {res['tokens_per_s']:.0f} supervised tok/s, peak {res['peak_mem_mb']:.0f} MB"
        + (f", MFU {100 * res['mfu']:.1f}%" if "mfu" in res else "") + f", loss {res.get('loss_last')}")
    return res


def compare_ours(args, model, tok, device, plan) -> dict:
    from core.config import DataConfig, RunConfig, TrainConfig
    from core.methods import method_config
    from core.train import train

    c = COMPARE[args.case]
    cfg = RunConfig(
        model="(preloaded)", method=method_config(c["method"], LORA_KNOBS if args.case == "lora" else {}),
        train=TrainConfig(lr=c["lr"], scheduler="linear", max_steps=plan["steps"], batch_size=plan["batch"],
                          max_len=plan["max_len"], seed=SEED, log_every=plan["log_every"], device=device.type),
        data=DataConfig(path=str(INSTRUCTION), val_fraction=0.0),
    )
    gen = train(cfg, Path(args.work) / f"ours-{args.case}", model=model, tokenizer=tok)
    steps, start, end = [], {}, None
    for ev in gen:
        if ev["type"] == "start":
            start = ev
        elif ev["type"] == "step":
            steps.append(ev)
            say(f"  step {ev['step']}: loss {ev['loss']:.4f}, {ev['tokens_per_s']:.0f} tok/s")
            if ev["step"] == plan["steps"]:
                break  # the last step: measure before the final checkpoint (the peer saves nothing either)
        elif ev["type"] == "end":
            end = ev
    mem = peak_mb(device)
    gen.close()  # no checkpoint, no adapter: the run ends as "stopped"
    if end is not None and end.get("status") != "completed":
        raise RuntimeError(f"our run ended early: {end}")
    warm_events = plan["warm"] // plan["log_every"]
    return {"tokens_per_s": steady_tokens_per_s(steps, skip=warm_events), "peak_mem_mb": mem,
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"], "trainable": start.get("trainable")}


def compare_peer(args, model, tok, device, plan) -> dict:
    """transformers.Trainer (+ peft for LoRA) as its users run it: pad to the longest row of each batch, the
    model's own loss over the whole vocabulary, the Trainer's default optimiser, length-grouped sampling."""
    import dataclasses

    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from bench.common import encode_file
    from bench.peer import Rows, features

    c = COMPARE[args.case]
    if args.case == "lora":
        k = LORA_KNOBS
        model = peft.get_peft_model(model, peft.LoraConfig(r=k["r"], lora_alpha=k["alpha"], lora_dropout=k["dropout"],
                                                           target_modules=k["targets"], task_type="CAUSAL_LM"))
    else:
        model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = Rows([features(e) for e in encode_file(INSTRUCTION, tok)])
    base = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    counts: list[int] = []  # supervised tokens of each batch, in the order the Trainer draws them

    def collator(feats):
        batch = base(feats)
        counts.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    marks: dict[int, float] = {}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (plan["warm"], plan["steps"]):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                say(f"  step {state.global_step}: loss {logs['loss']:.4f}")

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    want = dict(output_dir=str(Path(args.work) / f"peer-{args.case}"), per_device_train_batch_size=plan["batch"],
                max_steps=plan["steps"], learning_rate=c["lr"], lr_scheduler_type="linear", warmup_steps=0,
                seed=SEED, report_to="none", save_strategy="no", logging_steps=plan["log_every"], disable_tqdm=True,
                use_cpu=device.type == "cpu", bf16=bf16, dataloader_num_workers=0)
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "group_by_length" in known:  # transformers < 5.2x: a flag; later: a sampling strategy
        want["group_by_length"] = True
    elif "train_sampling_strategy" in known:
        want["train_sampling_strategy"] = "group_by_length"
    targs = TrainingArguments(**{k: v for k, v in want.items() if k in known})
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    mem = peak_mb(device)
    timed = sum(counts[plan["warm"] : plan["steps"]])
    return {"tokens_per_s": timed / (marks[plan["steps"]] - marks[plan["warm"]]), "peak_mem_mb": mem,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "trainable": trainable, "optim": str(targs.optim), "collator_calls": len(counts),
            "sampler": want.get("train_sampling_strategy", "group_by_length")}


# ---------------------------------------------------------------------------------------------------------------
# Part: tests (the orchestrator runs pytest itself; see run_tests)


def run_tests(args, env: dict, timeout: float, log) -> dict:
    import importlib.util

    files = args.tests or (TESTS_DRY if args.dry else TESTS_GPU)
    junit = Path(args.work) / "junit.xml"
    pyargs = ["-q", "-m", "not slow and not browser", "-p", "no:cacheprovider", "-rfE", "--durations=10",
              f"--junitxml={junit}", *files]
    if importlib.util.find_spec("pytest_timeout"):
        pyargs.insert(0, "--timeout=90")
    workers = 0 if args.dry or not importlib.util.find_spec("xdist") else 8
    if workers:
        pyargs[:0] = ["-n", str(workers), "--dist", "loadfile"]
    code = hide_code() + f"import pytest\nsys.exit(pytest.main({pyargs!r}))\n"
    env = dict(env, OMP_NUM_THREADS="2")
    rc, out = stream([sys.executable, "-c", code], env, timeout, "tests", log)
    Path(args.out, "pytest.txt").write_text(out)
    res = {"files": files, "workers": workers, "rc": rc, "timed_out": rc == "timeout"}
    # until pytest ends there is no junit file: count the progress characters of the lines printed so far
    import re

    marks = "".join(m.group(1) for m in re.finditer(r"^([.FEsxX]+)\s*(?:\[\s*\d+%\])?\s*$", out, re.M))
    res["progress"] = {"passed": marks.count("."), "failed": marks.count("F"), "errors": marks.count("E"),
                       "skipped": marks.count("s")}
    if junit.exists():
        import xml.etree.ElementTree as ET

        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for key in ("tests", "failures", "errors", "skipped"):
            res[key] = sum(int(s.get(key, 0)) for s in suites)
        res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
        res["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
        res["failed"] = [f"{tc.get('classname')}::{tc.get('name')}" for s in suites for tc in s.iter("testcase")
                         if tc.find("failure") is not None or tc.find("error") is not None]
    return res


# ---------------------------------------------------------------------------------------------------------------
# Orchestrator


def stream(cmd: list[str], env: dict, timeout: float, tag: str, log) -> tuple[int | str, str]:
    """Run ``cmd`` in its own process group, echoing its lines as '[tag] ...'; kill the group after ``timeout``.
    Returns (exit code or 'timeout', the whole output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            msg = f"[{tag}] {line.rstrip()}"
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | str = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        rc = "timeout"
        say(f"[{tag}] TIMEOUT after {timeout:.0f}s: killing process group {proc.pid}")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=5)
    return rc, "".join(lines)


def run_part(args, part: str, extra: list[str], env: dict, timeout: float, log) -> dict:
    """One part in a fresh process; its result is the JSON it writes to <work>/<part>[-extra].json."""
    tag = "-".join([part] + [e for e in extra if not e.startswith("--")])
    result_file = Path(args.work) / f"{tag}.json"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--part", part, "--work", args.work, "--out", args.out,
           "--result", str(result_file), *extra] + (["--dry"] if args.dry else [])
    t0 = time.perf_counter()
    rc, out = stream(cmd, env, timeout, tag, log)
    wall = round(time.perf_counter() - t0, 1)
    if result_file.exists():
        res = json.loads(result_file.read_text())
    else:
        res = {"error": f"exit {rc}", "tail": out[-2000:]}
        partial = Path(args.work) / f"{part}.partial.json"
        if partial.exists():
            res["rows"] = json.loads(partial.read_text())
    res.update(part_wall_s=wall, part_rc=rc)
    say(f"== {tag}: {'ok' if rc == 0 else rc} in {wall}s")
    return res


def fmt(v, spec: str = ".3f", none: str = "–") -> str:
    return none if v is None else format(v, spec)


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def report_md(r: dict) -> str:
    """The tables of gpu_check.md, from the results gathered so far (a part that did not run shows dashes)."""
    s = r.get("setup", {})
    lines = [f"# GPU check{' (DRY, CPU, tiny models)' if r['dry'] else ''}", "",
             f"{s.get('gpu', 'no GPU')} (cc {s.get('capability', '–')}, {s.get('gpu_mem_gib', '–')} GiB); "
             f"torch {s.get('torch')}, transformers {s.get('transformers')}, peft {s.get('peft')}, "
             f"python {s.get('python')}. Whole check {r.get('total_s', 0):.0f}s. Hidden modules: {', '.join(HIDDEN)}.",
             ""]
    m = r.get("methods", {})
    first = (m.get("rows") or [{}])[0]
    lines += [f"## Every registered method: {first.get('steps', '?')} steps of core.train.train (log_every 1), "
              f"random SmolLM2-135M shape ({fmt(first.get('total_params'), ',')} params), {m.get('data', '?')}, "
              f"batch 8, {first.get('base_dtype', '?')} base on {m.get('device', '?')} (on CUDA: fp32 trainable, bf16 "
              "autocast); sup tok/s after the first 3 steps", "",
              "| method | status | trainable | loss first → last | sup tok/s | peak MB | wall s |",
              "|---|---|---|---|---|---|---|"]
    for row in m.get("rows", []):
        status = row.get("status")
        if status != "completed":
            status = f"{status}: {str(row.get('reason'))[:100]}"
        lines.append(f"| {row['method']} | {status} | {fmt(row.get('trainable'), ',')} "
                     f"| {fmt(row.get('loss_first'))} → {fmt(row.get('loss_last'))} "
                     f"| {fmt(row.get('tokens_per_s'), '.0f')} | {fmt(row.get('peak_mem_mb'), '.0f')} "
                     f"| {fmt(row.get('wall_s'), '.1f')} |")
    if "error" in m:
        lines.append(f"\nmethods part: {m['error']}")
    c = r.get("compare", {})
    plan = compare_plan(r["dry"])
    n = next((x.get("n_params") for x in c.values() if x.get("n_params")), None)
    shape = "d 64, 2 blocks" if r["dry"] else "d 2048, 16 blocks, GQA 32/8, ff 8192"
    lines += ["", f"## Ours vs transformers.Trainer + peft: random Llama of {fmt(n, ',')} params ({shape}), "
              f"instruction_sample.json, batch {plan['batch']}, {plan['steps']} steps, timed over steps "
              f"{plan['warm'] + 1}..{plan['steps']}", "",
              f"MFU = 6·N·(supervised tokens/s) ÷ {PEAK_FLOPS:.3g} FLOP/s (H200 SXM dense bf16, datasheet). "
              "It counts supervised tokens only (prompt tokens also run forward and backward: multiply by "
              "input/supervised for the all-token MFU) and 6N also for LoRA, whose frozen base skips the weight "
              "gradients (~4N).", "",
              "| case | side | base dtype | trainable | sup tok/s | ours/peer speed | peak MB | MFU (sup) "
              "| loss first → last | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for case in COMPARE:
        o, p = c.get(f"{case}-ours", {}), c.get(f"{case}-peer", {})
        for side, x in (("ours", o), ("peer", p)):
            ratio = None
            if side == "ours" and o.get("tokens_per_s") and p.get("tokens_per_s"):
                ratio = o["tokens_per_s"] / p["tokens_per_s"]
            status = "ok" if x.get("part_rc") == 0 else f"{x.get('part_rc')}: {str(x.get('error', ''))[:60]}"
            lines.append(f"| {case} | {side} | {x.get('base_dtype', '–')} | {fmt(x.get('trainable'), ',')} "
                         f"| {fmt(x.get('tokens_per_s'), '.0f')} | {fmt(ratio, '.2f')}{'x' if ratio else ''} "
                         f"| {fmt(x.get('peak_mem_mb'), '.0f')} | {pct(x.get('mfu'))} "
                         f"| {fmt(x.get('loss_first'))} → {fmt(x.get('loss_last'))} | {status} |")
    ratio = next((x.get("input_per_supervised") for x in c.values() if x.get("input_per_supervised")), None)
    if ratio:
        lines.append(f"\ninput tokens per supervised token in the data: {ratio:.2f}")
    t = r.get("tests", {})
    lines += ["", "## Engine tests with CUDA visible", "",
              f"{t.get('passed', '?')} passed, {t.get('failures', '?')} failed, {t.get('errors', '?')} errors, "
              f"{t.get('skipped', '?')} skipped of {t.get('tests', '?')} (rc {t.get('rc')}, {t.get('time_s', '?')}s, "
              f"xdist workers {t.get('workers')}): {' '.join(t.get('files', []))}"]
    if t.get("failed"):
        lines += ["", "failed: " + ", ".join(t["failed"][:30])]
    if t.get("error"):
        lines += ["", f"tests part: {t['error']}"]
    if t.get("timed_out"):
        lines += ["", f"tests timed out; progress marks printed before: {t.get('progress')}"]
    return "\n".join(lines) + "\n"


def orchestrate(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check-")
    caps = DRY_CAPS if args.dry else CAPS
    budget = args.budget or (sum(DRY_CAPS.values()) + 600 if args.dry else BUDGET_S)
    t_start = time.perf_counter()
    deadline = t_start + budget
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PEFT_STUDIO_CACHE=str(Path(args.work) / "cache"))
    r: dict = {"dry": args.dry, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget, "caps_s": caps}
    parts = args.parts.split(",")
    with open(out / "gpu_check.log", "a") as log:
        def save():
            r["total_s"] = round(time.perf_counter() - t_start, 1)
            (out / "gpu_check.json").write_text(json.dumps(r, indent=1, default=str))
            (out / "gpu_check.md").write_text(report_md(r))

        tests_on = "tests" in parts
        reserve = TESTS_RESERVE_S if tests_on and not args.dry else 0  # earlier parts leave the tests this much

        def left(part: str) -> float:
            return min(caps[part], deadline - time.perf_counter() - (0 if part == "tests" else reserve))

        say(f"gpu_check: parts {parts}, budget {budget}s, work {args.work}, out {out}")
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            r["nvidia_smi"] = smi.stdout.strip()
            say("nvidia-smi:", r["nvidia_smi"])
        r["setup"] = run_part(args, "setup", [], env, left("setup"), log)
        save()
        if "methods" in parts:
            r["methods"] = run_part(args, "methods", [], env, left("methods"), log)
            save()
        if "compare" in parts:
            r["compare"] = {}
            for case in COMPARE:
                for side in ("ours", "peer"):
                    if left("compare") < 25:
                        r["compare"][f"{case}-{side}"] = {"error": "skipped: out of budget", "part_rc": "skipped"}
                        continue
                    r["compare"][f"{case}-{side}"] = run_part(args, "compare", ["--case", case, "--side", side], env,
                                                              left("compare"), log)
                    save()
        if tests_on:
            say(f"== tests: {left('tests'):.0f}s left for them")
            try:
                r["tests"] = run_tests(args, env, left("tests"), log)
            except Exception as e:  # noqa: BLE001 - the report is still written
                r["tests"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            say(f"== tests: {r['tests'].get('passed')} passed, {r['tests'].get('failures')} failed, "
                f"{r['tests'].get('errors')} errors, rc {r['tests'].get('rc')}")
        save()
    say("\n" + (out / "gpu_check.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check")
    ap.add_argument("--dry", action="store_true", help="tiny models, 2 steps, CPU is fine: test this script")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check_out")
    ap.add_argument("--work", default="")
    ap.add_argument("--parts", default="methods,compare,tests", help="comma list (setup always runs)")
    ap.add_argument("--tests", nargs="*", default=None, help="test files (default: the GPU selection)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole check")
    ap.add_argument("--part", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)
    ap.add_argument("--side", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.part:
        orchestrate(args)
        return
    fn = {"setup": part_setup, "methods": part_methods, "compare": part_compare}[args.part]
    res = fn(args)
    Path(args.result).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
