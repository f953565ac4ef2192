"""Data tab: upload a .json/.jsonl/.csv/.parquet file or pick a bundled sample; see the detected format, the validation report,
a chat-template preview with trained and masked tokens in two colours, the token-length histogram, and the split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from core.config import DataConfig
from core.data import DataError

from .. import actions, charts
from ..datasets import EXTENSIONS
from ..format import esc, log
from ..knobs import widget

INTRO = (
    "Upload a dataset (**.json** array, **.jsonl** with one object per line, **.csv** or **.parquet**) or start "
    "from a bundled sample. "
    "Supported formats are detected from the field names: instruction (`instruction`, `input`, `output`), "
    "conversation (`messages` or ShareGPT `conversations`), QA (`question`, `answer`), classification "
    "(`text`, `label`) and plain text (`text`). The `identity_sample.json` sample teaches the model a new name "
    "you can check in the Chat tab."
)


def preview_html(dataset: dict | None, index: int | float | None) -> str:
    """The example rendered through the chat template; trained tokens highlighted. Every piece is HTML-escaped."""
    if not dataset or not dataset.get("previews"):
        return "<div class='ps-preview ps-muted'>Load a dataset to see how its examples are rendered.</div>"
    previews = dataset["previews"]
    i = min(max(int(index or 1), 1), len(previews)) - 1
    spans = "".join(
        f"<span class='{'ps-trained' if trained else 'ps-masked'}'>{esc(text)}</span>" for text, trained in previews[i]
    )
    legend = ("<div class='ps-legend'><span class='ps-trained'>trained (the loss is computed here)</span> "
              "<span class='ps-masked'>masked (prompt, template)</span> "
              f"<span class='ps-muted'>example {i + 1} of the first {len(previews)}</span></div>")
    return f"{legend}<pre class='ps-preview'>{spans}</pre>"


def summary_md(d: dict) -> str:
    s = d["stats"]
    lines = [
        f"✓ **{esc(d['name'])}** — detected format **{d['format']}**: {d['valid_rows']:,} of {d['total_rows']:,} rows "
        f"valid, {d['total_rows'] - d['valid_rows']:,} skipped.",
        f"Tokens per example: min {s['min']}, median {s['p50']}, p90 {s['p90']}, max {s['max']} · "
        f"{s['supervised_tokens']:,} trained tokens in total.",
    ]
    if d["n_truncated"]:
        lines.append(f"⚠ {d['n_truncated']} rows are longer than max_len = {d['max_len']} tokens and will be truncated.")
    return "  \n".join(lines)


def create_data_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    samples = list(ctx.samples())
    defaults = actions.form_defaults()  # TrainConfig.max_len, DataConfig.val_fraction / val_count
    with gr.Tab("Data", id="data"):
        gr.Markdown(INTRO, elem_classes="ps-intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                upload = gr.File(label="Upload .json / .jsonl / .csv / .parquet", file_types=list(EXTENSIONS),
                                 type="filepath",
                                 height=140, elem_id="ps-upload")
                with gr.Row():
                    sample = gr.Dropdown(samples, value="identity_sample.json" if "identity_sample.json" in samples
                                         else (samples[0] if samples else None), label="…or a bundled sample", scale=3)
                    use_sample = gr.Button("Use sample", variant="secondary", scale=1, elem_id="ps-use-sample")
                fields = widget(DataConfig, "fields", elem_id="ps-fields")
                max_len = gr.Number(defaults["train.max_len"], precision=0, minimum=8, maximum=131072, label="Max length (tokens)",
                                    info="Examples longer than this are truncated (training uses the same value).")
                with gr.Row():
                    val_fraction = gr.Number(defaults["data.val_fraction"], minimum=0, maximum=0.5, step=0.05, label="Validation fraction",
                                             info="Share of examples held out for the eval loss (0–0.5).")
                    val_count = gr.Number(defaults["data.val_count"], precision=0, minimum=0, label="…or exactly (examples)",
                                          info="Hold out this many instead (0 = use the fraction).")
            with gr.Column(scale=3, min_width=360):
                status = gr.Markdown("No dataset loaded yet.", elem_id="ps-data-status")
                issues = gr.Dataframe(headers=["row", "reason"], datatype=["number", "str"], value=[],
                                      label="Rows that will be skipped (row number and reason)", interactive=False,
                                      max_height=220, wrap=True)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                index = gr.Number(1, precision=0, minimum=1, label="Preview example #", elem_id="ps-preview-index")
                preview = gr.HTML(preview_html(None, 1), elem_id="ps-preview")
            with gr.Column(scale=2):
                hist = gr.Plot(charts.empty("Token lengths", "Load a dataset"), label="Token lengths", elem_id="ps-hist")

    dataset = shared["dataset"]
    outputs = [dataset, status, issues, preview, hist, index]

    def shown(d: dict) -> dict:
        return {dataset: d, status: summary_md(d), issues: d["issues"][:500], preview: preview_html(d, 1),
                hist: charts.length_histogram(d["lengths"], d["max_len"]), index: 1}

    def refused(message: str, current: dict | None) -> dict:
        """A file that cannot be used: say why; the dataset loaded before stays selected, nothing else changes."""
        keep = (f"  \nThe previously loaded dataset **{esc(current['name'])}** is still selected."
                if current else "")
        return {status: f"✗ {message}{keep}"}

    def load(inspect_it, name: str, current: dict | None) -> dict:
        try:
            return shown(inspect_it())
        except DataError as e:
            return refused(esc(e), current)
        except Exception as e:  # noqa: BLE001 - never a traceback in the UI
            log.exception("dataset %s could not be loaded", name)
            return refused(f"{esc(name)} could not be loaded: {esc(str(e)[:200])}", current)

    def on_upload(file_path, model, max_len_tokens, current, mapping):
        """Validate an uploaded file; a bad file leaves the current dataset and every run untouched."""
        if not file_path:
            return {}
        name = Path(str(file_path)).name
        return load(lambda: actions.upload_dataset(ctx, file_path, name, model, max_len_tokens, mapping), name, current)

    def on_sample(name, model, max_len_tokens, current, mapping):
        return load(lambda: actions.use_sample(ctx, name, model, max_len_tokens, mapping), str(name), current)

    upload.upload(on_upload, [upload, shared["model"], max_len, dataset, fields], outputs, api_name="upload_dataset")
    use_sample.click(on_sample, [sample, shared["model"], max_len, dataset, fields], outputs, api_name="use_sample")
    index.change(preview_html, [dataset, index], preview, api_visibility="private", show_progress="hidden")
    return {"upload": upload, "sample": sample, "use_sample": use_sample, "max_len": max_len, "fields": fields,
            "val_fraction": val_fraction, "val_count": val_count, "status": status, "issues": issues,
            "preview": preview, "hist": hist, "index": index}
