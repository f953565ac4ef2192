"""Export tab: download a finished run's adapter as a zip (PEFT format where PEFT has the method), or bake it
into a merged Hugging Face model folder (methods that can merge), and copy a snippet that loads it."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .. import actions
from ..export import can_merge, loading_snippet
from ..format import esc, run_label, user_error
from ..i18n import T, choice, t
from .common import finished_with_adapter, safe_get
from .tokens import create_tokens_panel


def create_export_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    with gr.Tab(T("tab.export"), id="export") as tab:
        gr.Markdown(T("export.intro"))
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                run = gr.Dropdown([], label=T("export.run"), elem_id="ps-export-run", allow_custom_value=True)
                info = gr.Markdown()
                with gr.Row():
                    zip_btn = gr.Button(T("export.zip"), variant="primary", elem_id="ps-export-zip")
                    merge_btn = gr.Button(T("export.merge"), elem_id="ps-export-merge")
                with gr.Row():
                    encoding = gr.Radio(["f16", "q8_0"], value="f16", label=T("export.gguf_encoding"), scale=2,
                                        info=T("export.gguf_encoding_info"))
                    gguf_btn = gr.Button(T("export.gguf"), elem_id="ps-export-gguf", scale=1)
                files = gr.File(label=T("export.files"), file_count="multiple", interactive=False,
                                elem_id="ps-export-files")
                message = gr.Markdown(elem_id="ps-export-message")
            with gr.Column(scale=3):
                snippet = gr.Code(T("export.choose"), language="python", label=T("export.snippet"), interactive=False)
                tokens = create_tokens_panel(ctx, tab)

    def on_select(run_id):
        r = safe_get(ctx, run_id)
        if r is None:
            return "", T("export.choose"), gr.update(interactive=False), gr.update(interactive=False)
        text = t("export.info", name=esc(r.name), method=esc(r.method), model=esc(r.model),
                 status=choice("status", r.status),
                 merge=t("export.can_merge") if can_merge(r) else t("export.cannot_merge"))
        return text, loading_snippet(r), gr.update(interactive=can_merge(r)), gr.update(interactive=can_merge(r))

    def on_zip(run_id):
        z = actions.export_adapter(ctx, run_id)
        return [z["path"]], t("export.zipped", name=esc(z["name"]), mb=f"{z['bytes'] / 2**20:.2f}"), z["snippet"]

    def on_merge(run_id):
        m = actions.export_merged(ctx, run_id)
        msg = t("export.merged", name=esc(m["name"]), folder=esc(m["folder"]))
        return [m["archive"]] if m["archive"] else [], msg, m["snippet"]

    def on_gguf(run_id, gguf_encoding):
        g = actions.export_gguf(ctx, run_id, gguf_encoding)
        msg = t("export.gguf_written", encoding=g["encoding"], name=esc(g["name"]), mb=f"{g['bytes'] / 2**20:.1f}")
        return [g["path"]], msg, g["snippet"]

    def refresh(current):
        runs = finished_with_adapter(ctx)
        ids = {r.id for r in runs}
        return gr.update(choices=[(run_label(r), r.id) for r in runs], value=current if current in ids else None)

    run.change(on_select, run, [info, snippet, merge_btn, gguf_btn], api_visibility="private")
    zip_btn.click(user_error(on_zip), run, [files, message, snippet], api_name="export_adapter")
    merge_btn.click(user_error(on_merge), run, [files, message, snippet], api_name="export_merged")
    gguf_btn.click(user_error(on_gguf), [run, encoding], [files, message, snippet], api_name="export_gguf")
    tab.select(refresh, run, run, api_visibility="private")
    return {"run": run, "files": files, "message": message, "snippet": snippet, **tokens}
