"""Adapter folders on disk.

An adapter folder holds three files:

    adapter_config.json         PEFT's schema for LoRA, prompt tuning, prefix tuning, P-Tuning (v1 and v2), so
                                ``peft.PeftModel.from_pretrained(base, folder)`` loads it; our own schema otherwise
    adapter_model.safetensors   the tensors returned by ``Method.adapter_tensors``
    peft_studio.json            our sidecar: {"format_version", "method", "method_config", "base_model",
                                "base_shape": {model_type, hidden_size, num_layers, vocab_size}}

Folders are written to a temporary sibling and renamed into place, so a crash never leaves half an adapter.
Weights are only ever read with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from .blocks import model_shape
from .config import method_config
from .methods import Method, build_method

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "peft_studio.json"
FORMAT_VERSION = 1


def base_shape(model: nn.Module) -> dict[str, Any]:
    s = model_shape(model)
    return {
        "model_type": getattr(model.config, "model_type", "?"),
        "hidden_size": s.hidden_size,
        "num_layers": s.num_layers,
        "vocab_size": s.vocab_size,
    }


def atomic_dir(final: Path) -> Path:
    """A fresh temporary folder next to ``final``; pass it to ``commit_dir`` when fully written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp``. The old folder is moved aside first and removed only after the rename."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{tmp.name[-8:]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(model: nn.Module, method: Method, folder: str | Path, base_model: str = "") -> Path:
    """Write the adapter folder atomically and return its path."""
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in method.adapter_tensors(model).items()}
    config = method.adapter_config(model)
    if base_model:
        config.setdefault("base_model_name_or_path", base_model)
    sidecar = {
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "method_config": method.config.to_dict(),
        "base_model": base_model,
        "base_shape": base_shape(model),
    }
    tmp = atomic_dir(folder)
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
        commit_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_sidecar(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"adapter folder {folder} does not exist")
    for name in (SIDECAR, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise ValueError(f"adapter folder {folder} is incomplete: {name} is missing")
    try:
        return json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"adapter folder {folder} is corrupt: {SIDECAR} is not valid JSON ({e})") from None


def check_base(model: nn.Module, sidecar: dict[str, Any], folder: Path) -> None:
    """Refuse an adapter trained on a different base model, naming what differs."""
    want = sidecar.get("base_shape") or {}
    have = base_shape(model)
    diffs = [f"{k} {want[k]} vs {have[k]}" for k in have if k in want and want[k] != have[k]]
    if diffs:
        raise ValueError(
            f"adapter {folder} was trained on a different base model (adapter vs this model: {', '.join(diffs)})"
        )


def load_adapter(model: nn.Module, folder: str | Path) -> Method:
    """Apply the saved method to ``model`` and load its tensors. Returns the method, ready for inference."""
    folder = Path(folder)
    sidecar = read_sidecar(folder)
    check_base(model, sidecar, folder)
    method = build_method(method_config(sidecar["method"], sidecar.get("method_config")))
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"adapter folder {folder} is corrupt: {ADAPTER_WEIGHTS} cannot be read ({e})") from None
    method.apply(model)
    try:
        method.load_adapter_tensors(model, tensors)
    except ValueError as e:
        method.remove(model)
        raise ValueError(f"adapter {folder}: {e}") from None
    model.requires_grad_(False)
    return method
