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
from ..i18n import T, choice, t
from ..knobs import pairs_text, widget
from ..messages import localize

def issue_table(rows: list | None = None) -> dict:
    """The skipped-rows table in the user's language: headers, and each reason translated (studio.messages)."""
    return {"headers": [t("data.issues.row"), t("data.issues.reason")],
            "data": [[row, localize(reason)] for row, reason in (rows or [])]}


def preview_html(dataset: dict | None, index: int | float | None) -> str:
    """The example rendered through the chat template; trained tokens highlighted. Every piece is HTML-escaped."""
    if not dataset or not dataset.get("previews"):
        return f"<div class='ps-preview ps-muted'>{T('data.preview_empty')}</div>"
    previews = dataset["previews"]
    i = min(max(int(index or 1), 1), len(previews)) - 1
    spans = "".join(
        f"<span class='{'ps-trained' if trained else 'ps-masked'}'>{esc(text)}</span>" for text, trained in previews[i]
    )
    legend = (f"<div class='ps-legend'><span class='ps-trained'>{t('data.legend.trained')}</span> "
              f"<span class='ps-masked'>{t('data.legend.masked')}</span> "
              f"<span class='ps-muted'>{t('data.legend.example', i=i + 1, n=len(previews))}</span></div>")
    return f"{legend}<pre class='ps-preview'>{spans}</pre>"


def summary_md(d: dict) -> str:
    s = d["stats"]
    lines = [
        t("data.summary", name=esc(d["name"]), format=choice("format", d["format"]), valid=f"{d['valid_rows']:,}",
          total=f"{d['total_rows']:,}", skipped=f"{d['total_rows'] - d['valid_rows']:,}"),
        t("data.tokens", min=s["min"], p50=s["p50"], p90=s["p90"], max=s["max"], trained=f"{s['supervised_tokens']:,}"),
    ]
    if d["n_truncated"]:
        lines.append(t("data.truncated", n=d["n_truncated"], max_len=d["max_len"]))
    return "  \n".join(lines)


def create_data_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    samples = list(ctx.samples())
    defaults = actions.form_defaults()  # TrainConfig.max_len, DataConfig.val_fraction / val_count
    with gr.Tab(T("tab.data"), id="data"):
        gr.Markdown(T("data.intro"), elem_classes="ps-intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                upload = gr.File(label=T("data.upload"), file_types=list(EXTENSIONS),
                                 type="filepath",
                                 height=140, elem_id="ps-upload")
                with gr.Row():
                    sample = gr.Dropdown(samples, value="identity_sample.json" if "identity_sample.json" in samples
                                         else (samples[0] if samples else None), label=T("data.sample"), scale=3)
                    use_sample = gr.Button(T("data.use_sample"), variant="secondary", scale=1, elem_id="ps-use-sample")
                fields = widget(DataConfig, "fields", elem_id="ps-fields")
                max_len = gr.Number(defaults["train.max_len"], precision=0, minimum=8, maximum=131072,
                                    label=T("data.max_len"), info=T("data.max_len_info"))
                with gr.Row():
                    val_fraction = gr.Number(defaults["data.val_fraction"], minimum=0, maximum=0.5, step=0.05,
                                             label=T("data.val_fraction"), info=T("data.val_fraction_info"))
                    val_count = gr.Number(defaults["data.val_count"], precision=0, minimum=0, label=T("data.val_count"),
                                          info=T("data.val_count_info"))
            with gr.Column(scale=3, min_width=360):
                status = gr.Markdown(T("data.none_loaded"), elem_id="ps-data-status")
                issues = gr.Dataframe(headers=["row", "reason"], datatype=["number", "str"], value=[],
                                      label=T("data.issues"), interactive=False,
                                      max_height=220, wrap=True)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                index = gr.Number(1, precision=0, minimum=1, label=T("data.preview_index"), elem_id="ps-preview-index")
                preview = gr.HTML(preview_html(None, 1), elem_id="ps-preview")
            with gr.Column(scale=2):
                hist = gr.Plot(None, label=T("data.hist"), elem_id="ps-hist")
        # Inside the tab: a component made directly under gr.Tabs shifts the tab labels after it.
        source = gr.State(None)  # the file or sample loaded last, accepted or not, and the settings it was read with
        # the dataset accepted last, kept in the browser: a reload (the language switch) or a restarted studio
        # reads it again
        remembered = gr.BrowserState(None, storage_key="peft-studio-dataset", secret=ctx.browser_secret)

    dataset = shared["dataset"]
    outputs = [dataset, status, issues, preview, hist, index]

    def shown(d: dict) -> dict:
        return {dataset: d, status: summary_md(d), issues: issue_table(d["issues"][:500]), preview: preview_html(d, 1),
                hist: charts.length_histogram(d["lengths"], d["max_len"]), index: 1}

    def refused(message: str, current: dict | None) -> dict:
        """A file that cannot be used: say why; the dataset loaded before stays selected, nothing else changes."""
        keep = "  \n" + t("data.still_selected", name=esc(current["name"])) if current else ""
        return {status: f"✗ {message}{keep}"}

    def load(inspect_it, name: str, current: dict | None) -> dict:
        try:
            return shown(inspect_it())
        except DataError as e:
            return refused(esc(localize(e)), current)
        except Exception as e:  # noqa: BLE001 - never a traceback in the UI
            log.exception("dataset %s could not be loaded", name)
            return refused(t("data.could_not_load", name=esc(name), detail=esc(localize(str(e)[:200]))), current)

    readers = {"upload": actions.upload_dataset, "sample": actions.use_sample, "stored": actions.reopen_dataset}

    def read(kind: str, what: str, model, max_len_tokens, current, mapping) -> dict:
        name = Path(what).name if kind == "upload" else str(what)
        out = load(lambda: readers[kind](ctx, what, model=model, max_len=max_len_tokens, fields=mapping), name, current)
        out[source] = {"kind": kind, "what": what, "settings": [mapping, max_len_tokens]}
        return out

    def remember(d: dict | None):
        """The dataset as the browser keeps it ("file", not "path": gradio's client takes a dict with a "path"
        for a file to fetch)."""
        return {"file": d["path"], "fields": d["fields"], "max_len": d["max_len"]} if d else gr.skip()

    def on_upload(file_path, model, max_len_tokens, current, mapping):
        """Validate an uploaded file; a bad file leaves the current dataset and every run untouched."""
        if not file_path:
            return {status: gr.skip()}  # an empty dict would count as one value for all the outputs
        return read("upload", file_path, model, max_len_tokens, current, mapping)

    def on_sample(name, model, max_len_tokens, current, mapping):
        return read("sample", name, model, max_len_tokens, current, mapping)

    def on_settings(src, model, max_len_tokens, current, mapping):
        """The column mapping or max length changed: read the last file again with them, so a file refused for
        its column names loads once they are mapped, and the report shows the new truncation."""
        if not src or src["settings"] == [mapping, max_len_tokens]:
            return {status: gr.skip()}
        return read(src["kind"], src["what"], model, max_len_tokens, current, mapping)

    upload.upload(on_upload, [upload, shared["model"], max_len, dataset, fields], [*outputs, source],
                  api_name="upload_dataset")
    use_sample.click(on_sample, [sample, shared["model"], max_len, dataset, fields], [*outputs, source],
                     api_name="use_sample")
    for widget_, events in ((fields, ("submit", "blur")), (max_len, ("submit", "blur"))):
        for ev in events:
            getattr(widget_, ev)(on_settings, [source, shared["model"], max_len, dataset, fields], [*outputs, source],
                                 api_visibility="private")
    index.change(preview_html, [dataset, index], preview, api_visibility="private", show_progress="hidden")

    def on_page_load(kept, model) -> dict:
        """A page (re)loads: the dataset it had, read again in the page's language; else the empty report's
        texts, which a page can only get from the server in its language (the table's headers, the chart)."""
        empty = {issues: issue_table(), hist: charts.length_histogram([])}
        if not kept:
            return empty
        try:
            mapping = pairs_text(kept["fields"])
            out = read("stored", kept["file"], model, kept["max_len"], None, mapping)
        except (KeyError, TypeError, AttributeError):  # kept by another version of the studio
            out = {}
        if dataset not in out:  # deleted since, or the file is no longer one the studio may read
            return {**empty, remembered: None}
        return {**out, fields: mapping, max_len: kept["max_len"]}

    dataset.change(remember, dataset, remembered, api_visibility="private")
    shared["on_load"].append((on_page_load, [remembered, shared["model"]],
                              [*outputs, source, remembered, fields, max_len]))
    return {"upload": upload, "sample": sample, "use_sample": use_sample, "max_len": max_len, "fields": fields,
            "val_fraction": val_fraction, "val_count": val_count, "status": status, "issues": issues,
            "preview": preview, "hist": hist, "index": index}
