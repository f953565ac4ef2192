"""Export tab: download a finished run's adapter as a zip (PEFT format where PEFT has the method), or bake it
into a merged Hugging Face model folder (methods that can merge), and copy a snippet that loads it."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..export import adapter_zip, can_merge, loading_snippet, merged_model
from ..format import esc, run_label, user_error
from .common import finished_with_adapter, safe_get


def create_export_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    with gr.Tab("Export", id="export") as tab:
        gr.Markdown("Pick a finished run. The adapter zip holds `adapter_config.json`, `adapter_model.safetensors` "
                    "and `peft_studio.json`; LoRA, prompt tuning, prefix tuning and P-Tuning load with 🤗 PEFT. "
                    "Methods that change weights (LoRA, BitFit, Freeze, FishMask, full) can also be merged into a "
                    "plain model folder that needs no PEFT at all.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                run = gr.Dropdown([], label="Run", elem_id="ps-export-run", allow_custom_value=True)
                info = gr.Markdown()
                with gr.Row():
                    zip_btn = gr.Button("Download adapter (.zip)", variant="primary", elem_id="ps-export-zip")
                    merge_btn = gr.Button("Export merged model", elem_id="ps-export-merge")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="ps-export-files")
                message = gr.Markdown(elem_id="ps-export-message")
            with gr.Column(scale=3):
                snippet = gr.Code("# choose a run", language="python", label="Load it in Python", interactive=False)

    def on_select(run_id):
        r = safe_get(ctx, run_id)
        if r is None:
            return "", "# choose a run", gr.update(interactive=False)
        text = (f"**{esc(r.name)}** · {esc(r.method)} on {esc(r.model)} · {r.status}. "
                + ("Can be merged into the base model." if can_merge(r) else "Cannot be merged: export the adapter."))
        return text, loading_snippet(r), gr.update(interactive=can_merge(r))

    def on_zip(run_id):
        r = ctx.store.require(run_id) if run_id else None
        if r is None:
            raise ValueError("Choose a run first.")
        path = adapter_zip(ctx.exports_dir, r)
        return [str(path)], f"Adapter of **{esc(r.name)}** zipped ({path.stat().st_size / 2**20:.2f} MB).", loading_snippet(r)

    def on_merge(run_id):
        r = ctx.store.require(run_id) if run_id else None
        if r is None:
            raise ValueError("Choose a run first.")
        folder, archive = merged_model(ctx.exports_dir, r)
        msg = f"Merged model of **{esc(r.name)}** written to `{esc(folder)}`."
        return [str(archive)] if archive else [], msg, loading_snippet(r, folder)

    def refresh(current):
        runs = finished_with_adapter(ctx)
        ids = {r.id for r in runs}
        return gr.update(choices=[(run_label(r), r.id) for r in runs], value=current if current in ids else None)

    run.change(on_select, run, [info, snippet, merge_btn], api_visibility="private")
    zip_btn.click(user_error(on_zip), run, [files, message, snippet], api_name="export_adapter")
    merge_btn.click(user_error(on_merge), run, [files, message, snippet], api_name="export_merged")
    tab.select(refresh, run, run, api_visibility="private")
    return {"run": run, "files": files, "message": message, "snippet": snippet}
