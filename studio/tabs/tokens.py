"""The API tokens panel (in the Export tab): create a token for a script (shown once), list tokens, revoke one.
The logic is studio.tokens'; ``python -m studio token ...`` does the same from a shell."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from .. import tokens
from ..format import esc, user_error
from ..i18n import T, t

HEADERS = ("tokens.col.id", "tokens.col.name", "tokens.col.created", "tokens.col.last_used", "tokens.col.state")


def _when(when: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when else t("tokens.never")


def token_rows(ctx) -> list[list[str]]:
    return [[r["id"], r["name"], _when(r["created"]), _when(r["last_used"]),
             t("tokens.revoked") if r["revoked"] else t("tokens.valid")] for r in tokens.listing(ctx.store)]


def token_table(ctx) -> dict[str, list]:
    """The tokens table, headers in the page's language."""
    return {"headers": [t(h) for h in HEADERS], "data": token_rows(ctx)}


def create_tokens_panel(ctx, tab: gr.Tab) -> dict[str, gr.Component]:
    """The panel, inside ``tab``; its table is read again whenever the tab is opened."""
    with gr.Accordion(T("tokens.title"), open=False, elem_id="ps-tokens"):
        gr.Markdown(T("tokens.intro"))
        with gr.Row():
            name = gr.Textbox(label=T("tokens.name"), placeholder=T("tokens.name_placeholder"), max_length=80,
                              scale=2)
            create = gr.Button(T("tokens.create"), elem_id="ps-token-create", scale=1)
        shown = gr.Textbox(label=T("tokens.new"), interactive=False, buttons=["copy"], elem_id="ps-token-new")
        table = gr.Dataframe(interactive=False, elem_id="ps-tokens-table")  # filled when the tab opens
        with gr.Row():
            which = gr.Textbox(label=T("tokens.which"), max_length=16, scale=2)
            revoke = gr.Button(T("tokens.revoke"), variant="stop", elem_id="ps-token-revoke", scale=1)
        message = gr.Markdown(elem_id="ps-token-message")

    def on_create(token_name: str):
        new = tokens.create(ctx.store, token_name)
        return new["token"], token_table(ctx), t("tokens.created", id=esc(new["id"]), name=esc(new["name"]))

    def on_revoke(token_id: str):
        revoked = tokens.revoke(ctx.store, token_id)
        return "", token_table(ctx), t("tokens.revoked_msg", id=esc(token_id.strip()), name=esc(revoked))

    tab.select(lambda: token_table(ctx), None, table, api_visibility="private")
    create.click(user_error(on_create), name, [shown, table, message], api_name="create_token")
    revoke.click(user_error(on_revoke), which, [shown, table, message], api_name="revoke_token")
    return {"token_name": name, "token_new": shown, "tokens_table": table, "token_revoke": which}


__all__ = ["create_tokens_panel", "token_rows"]
