"""Exports of a finished run, written under DATA/exports/<run id>/ (generated names only):

    adapter zip     the run's adapter folder (PEFT format where PEFT has the method) as <slug>-adapter.zip
    merged model    for methods that can merge: a plain Hugging Face model folder, plus its zip
    GGUF            the merged model as one <slug>-<f16|q8_0>.gguf file (Llama family and Qwen2; core.gguf_export)

Each carries core.model_card's README.md (the zip and the merged folder; a GGUF file holds weights only).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from core.checkpoint import SIDECAR, export_merged, load_adapter, read_sidecar
from core.methods import spec
from core.model_card import model_card, write_model_card

from .i18n import t
from .paths import inside
from .store import Run


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "run"


def can_merge(run: Run) -> bool:
    try:
        return bool(spec(run.method).can_merge)
    except ValueError:
        return False


def _zip_folder(folder: Path, dest: Path, arc_root: str, extra: dict[str, str] | None = None) -> Path:
    """Zip ``folder`` under ``arc_root``/, plus ``extra`` {file name: text} written beside its files."""
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.is_symlink() and str(f.relative_to(folder)) not in (extra or {}):
                z.write(f, f"{arc_root}/{f.relative_to(folder)}")
        for name, text in (extra or {}).items():
            z.writestr(f"{arc_root}/{name}", text)
    tmp.replace(dest)
    return dest


def adapter_zip(exports_dir: Path, run: Run) -> Path:
    """Zip the run's adapter folder; refuses when the run has no complete adapter."""
    if not run.has_adapter:
        raise ValueError(f"run '{run.name}' has no saved adapter yet (status: {run.status})")
    read_sidecar(run.adapter_dir)  # complete and readable, or a sentence saying what is missing
    out = inside(exports_dir, run.id)
    out.mkdir(parents=True, exist_ok=True)
    return _zip_folder(run.adapter_dir, out / f"{slug(run.name)}-adapter.zip", f"{slug(run.name)}-adapter",
                       {"README.md": model_card(run.adapter_dir, merged=False)})


def merged_model(exports_dir: Path, run: Run, zip_it: bool = True) -> tuple[Path, Path | None]:
    """Bake the adapter into a fresh copy of the base model and save a plain HF folder (and a zip of it)."""
    from core.models import load_model

    if not can_merge(run):
        raise ValueError(f"{run.method} cannot be merged into the base model; download the adapter instead")
    sidecar = read_sidecar(run.adapter_dir)
    model, tokenizer = load_model(sidecar.get("base_model") or run.model, device="cpu")
    method = load_adapter(model, run.adapter_dir)
    out = inside(exports_dir, run.id)
    out.mkdir(parents=True, exist_ok=True)
    folder = export_merged(model, method, tokenizer, out / "merged-model")
    write_model_card(folder, run.adapter_dir, merged=True)
    archive = _zip_folder(folder, out / f"{slug(run.name)}-merged.zip", f"{slug(run.name)}-merged") if zip_it else None
    return folder, archive


def gguf_file(exports_dir: Path, run: Run, encoding: str) -> Path:
    """The run merged into its base model, written as one GGUF file (f16 or q8_0) beside the merged folder."""
    from core.gguf_export import export_gguf

    folder, _ = merged_model(exports_dir, run, zip_it=False)
    return export_gguf(folder, folder.parent / f"{slug(run.name)}-{encoding}.gguf", encoding)  # type: ignore[arg-type]


def gguf_snippet(path: Path) -> str:
    """How to run or load a GGUF export."""
    return (f"# llama.cpp: llama-cli -m {path.name}    Ollama: a Modelfile with the line FROM ./{path.name}\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{path.parent}", gguf_file="{path.name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{path.parent}", gguf_file="{path.name}")\n')


def loading_snippet(run: Run, merged_folder: Path | None = None) -> str:
    """Python that loads the export with transformers (+ peft where the format is PEFT's)."""
    base = run.model if run.model != "default" else "HuggingFaceTB/SmolLM2-135M-Instruct"
    adapter = f"{slug(run.name)}-adapter"
    if merged_folder is not None:
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{merged_folder}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{merged_folder}")\n'
        )
    try:
        peft_type = spec(run.method).peft_type
    except ValueError:
        peft_type = None
    if peft_type:
        return (
            f"# {t('export.code.unzip')}\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from peft import PeftModel\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{adapter}")  # {peft_type}\n'
        )
    return (
        f"# {t('export.code.no_peft', method=run.method, sidecar=SIDECAR)}\n"
        "from core.checkpoint import load_adapter\n"
        "from core.models import load_model\n\n"
        f'model, tokenizer = load_model("{run.model}")\n'
        f'method = load_adapter(model, "{adapter}")\n'
    )
