"""Adapter folders on disk.

An adapter folder holds three files:

    adapter_config.json         PEFT's schema for LoRA, prompt tuning, prefix tuning, P-Tuning (v1 and v2), so
                                ``peft.PeftModel.from_pretrained(base, folder)`` loads it; our own schema otherwise
    adapter_model.safetensors   the tensors returned by ``Method.adapter_tensors``
    peft_studio.json            our sidecar: {"format_version", "method", "method_config", "base_model",
                                "base_shape": {model_type, hidden_size, num_layers, vocab_size}}

Folders are written to a temporary sibling and renamed into place, so a crash never leaves half an adapter.
Weights are only ever read with safetensors: nothing is unpickled.

Training checkpoints (``<run>/checkpoints/step-N/``, written by core.train, the last two kept):

    adapter/                    a usable adapter folder as above (what the run had learned at step N)
    trainable.safetensors       every trainable parameter by name: the exact training state, including what the
                                adapter folder does not hold (prefix tuning's reparameterising MLP, P-Tuning's
                                prompt encoder)
    optimizer.pt                ``optimizer.state_dict()`` (tensors, numbers and strings only)
    (whole tensors, also from an FSDP2 run: ``training_state`` gathers the shards, ``load_checkpoint`` cuts them)
    rng.pt                      torch (CPU and CUDA) and Python RNG states
    trainer_state.json          {"step", "micro_batches", "elapsed_s", "supervised_tokens"}: optimiser steps done,
                                micro-batches consumed (the data position: epoch = micro_batches // batches per
                                epoch), time spent, supervised tokens trained on

The ``.pt`` files are written with ``torch.save`` and read back with ``torch.load(weights_only=True)``.
The learning-rate schedule is a pure function of the step (core.schedules), so the step is its whole state.

``export_merged`` folds a mergeable method into the base weights and writes a plain Hugging Face model folder.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import dist
from .blocks import model_shape
from .methods import Method, build_method, method_config, specs
from .models import hold_weights_in

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
    for name in (ADAPTER_CONFIG, SIDECAR):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"adapter folder {folder} is corrupt: {name} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"adapter folder {folder} is corrupt: {name} holds {type(data).__name__}, not an object")
    method = data.get("method")  # data: the sidecar
    if not isinstance(method, str) or method not in specs():
        raise ValueError(f"adapter folder {folder} is corrupt: {SIDECAR} names no known method (got {method!r})")
    return data


def check_base(model: nn.Module, sidecar: dict[str, Any], folder: Path) -> None:
    """Refuse an adapter trained on a different base model, naming what differs."""
    want = sidecar.get("base_shape") or {}
    have = base_shape(model)
    diffs = [f"{k} {want[k]} vs {have[k]}" for k in have if k in want and want[k] != have[k]]
    if diffs:
        raise ValueError(
            f"adapter {folder} was trained on a different base model (adapter vs this model: {', '.join(diffs)})"
        )


def load_adapter(model: nn.Module, folder: str | Path, hold: torch.dtype | None = None) -> Method:
    """Apply the saved method to ``model`` and load its tensors. Returns the method, ready for inference.

    ``hold``: the dtype of the weights the method does not train, as training holds them under bf16-mixed (what
    it trains stays in its own dtype, fp32): a re-evaluation then computes what the run's final eval did."""
    folder = Path(folder)
    sidecar = read_sidecar(folder)
    check_base(model, sidecar, folder)
    method = build_method(method_config(sidecar["method"], sidecar.get("method_config")))
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"adapter folder {folder} is corrupt: {ADAPTER_WEIGHTS} cannot be read ({e})") from None
    model.requires_grad_(False)
    for p in model.parameters() if hold is not None else []:  # the values training started from ...
        if p.is_floating_point() and p.dtype != hold:
            p.data = p.data.to(hold).to(p.dtype)
    method.apply(model)  # marks what it trains
    try:
        method.load_adapter_tensors(model, tensors)
    except ValueError as e:
        method.remove(model)
        raise ValueError(f"adapter {folder}: {e}") from None
    if hold is not None:  # ... loaded in full precision, then what the method does not train held in ``hold``
        hold_weights_in(model, hold, but=method.trainable_parameters(model).values())
    model.requires_grad_(False)
    return method


# --------------------------------------------------------------------------------------------------------------
# Resume state


CHECKPOINTS = "checkpoints"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STALE = re.compile(r"^\.(adapter|step-\d+)\.(tmp|old)-[^/]+$")


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (dropout, shuffling helpers)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _STEP_DIR.match(d.name))]
    return [d for _, d in sorted(found) if (d / TRAINER_STATE).is_file()]


def checkpoint_step(folder: Path) -> int:
    """The optimiser step a checkpoint folder (``step-N``) was written after."""
    m = _STEP_DIR.match(folder.name)
    if m is None:
        raise ValueError(f"{folder} is not a checkpoint folder (step-N)")
    return int(m.group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                   keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What the optimiser owns, whole and on the CPU: every trainable parameter by name (including those gradual
    unfreezing holds back for now) and AdamW's state dict. ``model`` is the module whose parameters the optimiser
    holds. Under FSDP2 every shard is gathered: a collective, so every rank calls it; ranks that do not write
    pass ``keep=False`` and get nothing back."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = {}
    for p in params:
        value = dist.whole(p.detach())
        if keep:
            trainable[names[id(p)]] = value.to("cpu").contiguous()
    packed = optimizer.state_dict()
    state = {}
    for i, entries in packed["state"].items():  # new dicts: the packed ones are AdamW's own
        whole = {k: dist.whole(v) if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
        if keep:
            state[i] = {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in whole.items()}
    return trainable, {"state": state, "param_groups": packed["param_groups"]} if keep else {}


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: nn.Module,
    method: Method,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    base_model: str = "",
    keep: int = 2,
) -> Path:
    """Write ``<run>/checkpoints/step-<state["step"]>/`` atomically, then keep only the newest ``keep``.
    ``model`` (whole, not sharded) gives the adapter folder; ``trainable`` and ``optimizer_state`` come from
    ``training_state``."""
    final = Path(run_dir) / CHECKPOINTS / f"step-{int(state['step'])}"
    tmp = atomic_dir(final)
    try:
        save_adapter(model, method, tmp / "adapter", base_model=base_model)
        save_file(trainable, str(tmp / TRAINABLE), metadata={"format": "pt"})
        torch.save(optimizer_state, tmp / OPTIMIZER)
        torch.save(rng_state(), tmp / RNG)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the trainable parameters and optimiser state saved by ``save_checkpoint`` into an already set-up
    model (same method applied) and optimiser (same groups), sharded by FSDP2 or not: a checkpoint holds whole
    tensors, and each rank cuts its own shard. Returns the trainer state, with the RNG states under ``"rng"`` (restore them with ``set_rng_state`` at the point where the run should continue)."""
    folder = Path(folder)
    for name in (TRAINABLE, OPTIMIZER, RNG, TRAINER_STATE):
        if not (folder / name).is_file():
            raise ValueError(f"checkpoint {folder} is incomplete: {name} is missing")
    tensors = _read(folder, TRAINABLE, lambda p: load_file(str(p)))
    opt_state = _read(folder, OPTIMIZER, _load_plain)
    rng = _read(folder, RNG, _load_plain)
    state = _read(folder, TRAINER_STATE, lambda p: json.loads(p.read_text(encoding="utf-8")))
    if not isinstance(state, dict) or not isinstance(opt_state, dict) or not isinstance(rng, dict):
        raise ValueError(f"checkpoint {folder} is corrupt: a file holds the wrong kind of data")
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"checkpoint {folder} does not match this model/method: unknown parameters {unknown[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                want = tuple(params[name].shape)
                raise ValueError(f"checkpoint {folder}: {name} has shape {tuple(value.shape)}, expected {want}")
            params[name].copy_(dist.shard_like(value.to(dtype=params[name].dtype), params[name]))
    order = [p for g in optimizer.param_groups for p in g["params"]]
    for i, entries in opt_state.get("state", {}).items():  # AdamW's moments: this rank's shard, as its parameter
        for k, v in entries.items():
            if isinstance(i, int) and i < len(order) and isinstance(v, torch.Tensor) and v.shape == order[i].shape:
                entries[k] = dist.shard_like(v, order[i])
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {folder}: optimiser state does not match this run ({e})") from None
    state["rng"] = rng
    return state


def _load_plain(path: Path) -> Any:
    """torch.load that only accepts tensors and plain data: never unpickles an arbitrary object."""
    return torch.load(path, weights_only=True, map_location="cpu")


def _read(folder: Path, name: str, read) -> Any:
    """One checkpoint file, or one sentence saying why it cannot be used."""
    try:
        return read(folder / name)
    except pickle.UnpicklingError:
        raise ValueError(
            f"checkpoint {folder} refused: {name} holds pickled objects other than tensors and plain data, which "
            f"could run code when loaded; delete this checkpoint (or start without resume)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any damaged file becomes one sentence
        first = str(e).splitlines()[0] if str(e) else ""
        why = f"{type(e).__name__}: {first}"
        raise ValueError(f"checkpoint {folder} is corrupt: {name} cannot be read ({why})") from None


def remove_stale_temp(run_dir: str | Path) -> list[Path]:
    """Clear what a killed writer left behind: temporary checkpoint/adapter folders (``.NAME.tmp-*``), and the
    moved-aside ``.NAME.old-*`` copies (put back when ``NAME`` itself is missing). Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for root in (run_dir, run_dir / CHECKPOINTS):
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            m = _STALE.match(d.name)
            if not m or not d.is_dir() or d.is_symlink():
                continue
            final = root / m.group(1)
            if m.group(2) == "old" and not final.exists():
                d.rename(final)  # killed between the two renames of commit_dir: the old folder is the real one
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# --------------------------------------------------------------------------------------------------------------
# Export


def export_adapter(adapter_folder: str | Path, out_dir: str | Path) -> Path:
    """Copy an adapter folder (checked to be complete) to ``out_dir``, atomically."""
    adapter_folder, out_dir = Path(adapter_folder), Path(out_dir)
    read_sidecar(adapter_folder)
    tmp = atomic_dir(out_dir)
    try:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR):
            shutil.copy2(adapter_folder / name, tmp / name)
        commit_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_merged(model: nn.Module, method: Method, tokenizer, out_dir: str | Path) -> Path:
    """Fold ``method`` into the weights (``method.bake``) and write a plain HF model folder, atomically.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` and needs no PEFT code. ``model`` is changed
    in place and no longer carries the method afterwards. Refuses non-finite weights (a diverged run)."""
    if not method.can_merge:
        raise ValueError(
            f"method {method.name} cannot be merged into the base model (its result is extra tokens, not weight "
            f"changes); export the adapter instead"
        )
    out_dir = Path(out_dir)
    method.bake(model)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"refusing to export: merged weight {name} has NaN/inf values")
    tmp = atomic_dir(out_dir)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        commit_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
