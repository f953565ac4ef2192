"""Chat tab: the base model and up to four finished runs side by side. One message goes to every column; the
answers stream in, each column labelled with its method and knobs. Prompts and replies are shown as text: the
chatbots get HTML-escaped strings with markdown off, so nothing a user or a model writes is ever rendered."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .. import actions
from ..format import esc, run_label, user_error
from ..i18n import T
from .common import finished_with_adapter

SLOTS = 5  # base + 4 runs


def shown(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": esc(m["content"])} for m in history]


def label(column) -> str:
    """A column's heading: the run's name (or the base model's label) in bold, then its method and knobs; as text."""
    head, _, rest = column.label.partition(" · ")
    return f"**{esc(head)}** · {esc(rest)}"


def create_chat_tab(ctx, shared: dict[str, Any]) -> dict[str, gr.Component]:
    with gr.Tab(T("tab.chat"), id="chat") as tab:
        with gr.Row(equal_height=True):
            runs = gr.Dropdown([], multiselect=True, max_choices=4, label=T("chat.runs"), allow_custom_value=True,
                               scale=4, elem_id="ps-chat-runs")
            include_base = gr.Checkbox(True, label=T("chat.include_base"), scale=1)
        with gr.Accordion(T("chat.settings"), open=False):
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label=T("chat.temperature"),
                                        info=T("chat.temperature_info"))
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label=T("chat.top_p"), info=T("chat.top_p_info"))
                max_new = gr.Number(128, precision=0, minimum=1, maximum=4096, label=T("chat.max_new"))
                merged = gr.Radio([(T("chat.unmerged"), "unmerged"), (T("chat.merged"), "merged")], value="unmerged",
                                  label=T("chat.lora_weights"), info=T("chat.lora_weights_info"))
            system = gr.Textbox(label=T("chat.system"), placeholder=T("chat.system_placeholder"), lines=2)
        labels, bots, latencies, cols = [], [], [], []
        with gr.Row(equal_height=False):
            for i in range(SLOTS):
                with gr.Column(visible=i == 0, min_width=240) as col:
                    labels.append(gr.Markdown(T("chat.base_heading") if i == 0 else "", elem_classes="ps-col-label"))
                    bots.append(gr.Chatbot([], render_markdown=False, height=380, show_label=False,
                                           elem_id=f"ps-chat-{i}", elem_classes="ps-chatbot", feedback_options=None))
                    latencies.append(gr.Markdown("", elem_classes="ps-latency", elem_id=f"ps-latency-{i}"))
                cols.append(col)
        with gr.Row():
            msg = gr.Textbox(placeholder=T("chat.placeholder"), show_label=False, scale=6,
                             elem_id="ps-chat-input", max_lines=6)
            send = gr.Button(T("chat.send"), variant="primary", scale=1, elem_id="ps-chat-send")
            clear = gr.Button(T("chat.clear"), scale=1)
        notice = gr.Markdown(elem_id="ps-chat-notice")
        histories = gr.State({})
        pending = gr.State(None)

    def layout(run_ids, base, model, hist):
        _, cs = actions.chat_columns(ctx, run_ids, base, model)
        ups = [gr.update(visible=i < len(cs)) for i in range(SLOTS)]
        labs = [label(cs[i]) if i < len(cs) else "" for i in range(SLOTS)]
        chats = [shown(hist.get(cs[i].key, [])) if i < len(cs) else [] for i in range(SLOTS)]
        return *ups, *labs, *chats

    def on_send(text, run_ids, base, model, hist):
        """Add the user's message to every column's history (the .then step streams the answers)."""
        started = actions.chat_start(ctx, text, run_ids, base, model, hist)
        hist = started["histories"]
        if started["job"] is None:
            return gr.skip(), started["note"], None, *[gr.skip()] * (2 * SLOTS), hist
        keys = [k for k, _, _ in started["job"]["columns"]]
        chats = [shown(hist[keys[i]]) if i < len(keys) else gr.skip() for i in range(SLOTS)]
        return "", started["note"], started["job"], *chats, *[""] * SLOTS, hist

    def on_reply(job, hist, temperature, top_p, max_new_tokens, system, merged):
        """Stream every column's answer, one column after the other."""
        if not job:
            yield *[gr.skip()] * (2 * SLOTS), hist
            return
        hist = {k: list(v) for k, v in hist.items()}
        keys = [k for k, _, _ in job["columns"]]
        stats = [""] * SLOTS

        def frame(streaming: int | None = None, text: str = "") -> tuple:
            """Every output's value. (An output left as gr.skip() costs Gradio a new component and its config
            at every update, which slowed decoding by a third; an unchanged value costs an empty diff.)"""
            bots = [shown(hist[keys[j]]) if j < len(keys) else [] for j in range(SLOTS)]
            if streaming is not None:
                bots[streaming] = bots[streaming] + [{"role": "assistant", "content": esc(text)}]
            return *bots, *stats, hist

        for piece in actions.chat_reply(ctx, job, hist, temperature, top_p, max_new_tokens, system,
                                           merged == "merged"):
            if piece["done"]:  # the answer is in hist now
                stats[piece["column"]] = esc(piece["stats"])
                yield frame()
            else:
                yield frame(piece["column"], piece["text"])
        yield frame()  # the last frame carries every column, for a client that reads only the last one

    def on_clear():
        return {}, *[[] for _ in range(SLOTS)], *[""] * SLOTS

    def refresh_runs(current):
        runs_ = finished_with_adapter(ctx)
        ids = {r.id for r in runs_}
        return gr.update(choices=[(run_label(r), r.id) for r in runs_], value=[i for i in (current or []) if i in ids])

    reply_inputs = [pending, histories, temperature, top_p, max_new, system, merged]
    reply_outputs = [*bots, *latencies, histories]
    send_inputs = [msg, runs, include_base, shared["model"], histories]
    send_outputs = [msg, notice, pending, *bots, *latencies, histories]
    for trigger, api in ((msg.submit, "chat_send"), (send.click, None)):
        ev = trigger(user_error(on_send), send_inputs, send_outputs, api_name=api,
                     api_visibility="public" if api else "private")
        ev.then(user_error(on_reply), reply_inputs, reply_outputs, api_name="chat_reply" if api else None,
                api_visibility="public" if api else "private")
    for comp in (runs, include_base):
        comp.change(user_error(layout), [runs, include_base, shared["model"], histories], [*cols, *labels, *bots],
                    api_visibility="private")
    clear.click(on_clear, None, [histories, *bots, *latencies], api_name="chat_clear")
    tab.select(refresh_runs, runs, runs, api_visibility="private")
    def chat_runs() -> list:
        """[label, run id] of every finished run with an adapter."""
        return [[run_label(r), r.id] for r in finished_with_adapter(ctx)]

    shared["apis"].append((chat_runs, "chat_runs"))  # registered by ui.py, outside the Tabs
    return {"runs": runs, "msg": msg, "send": send, "bots": bots, "latencies": latencies, "notice": notice}
