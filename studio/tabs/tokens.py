"""The API tokens panel (in the Export tab): create a token for a script (shown once), list tokens, revoke one.
The logic is studio.tokens'; ``python -m studio token ...`` does the same from a shell."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from .. import tokens
from ..format import esc, user_error

HEADERS = ["id", "name", "created", "last used", "state"]


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "never"


def token_rows(ctx) -> list[list[str]]:
    return [[r["id"], r["name"], _when(r["created"]), _when(r["last_used"]),
             "revoked" if r["revoked"] else "valid"] for r in tokens.listing(ctx.store)]


def create_tokens_panel(ctx, tab: gr.Tab) -> dict[str, gr.Component]:
    """The panel, inside ``tab``; its table is read again whenever the tab is opened."""
    with gr.Accordion("API tokens (for scripts)", open=False, elem_id="ps-tokens"):
        gr.Markdown("Scripts call the HTTP API (`/api/v1`, docs at `/api/v1/docs`) with "
                    "`Authorization: Bearer <token>`. A token is shown once, when it is created; only its hash is "
                    "kept.")
        with gr.Row():
            name = gr.Textbox(label="Token name", placeholder="e.g. nightly-ci", max_length=80, scale=2)
            create = gr.Button("Create token", elem_id="ps-token-create", scale=1)
        shown = gr.Textbox(label="New token (copy it now)", interactive=False, buttons=["copy"],
                           elem_id="ps-token-new")
        table = gr.Dataframe(headers=HEADERS, value=token_rows(ctx), interactive=False,
                             elem_id="ps-tokens-table")
        with gr.Row():
            which = gr.Textbox(label="Token id to revoke", max_length=16, scale=2)
            revoke = gr.Button("Revoke", variant="stop", elem_id="ps-token-revoke", scale=1)
        message = gr.Markdown(elem_id="ps-token-message")

    def on_create(token_name: str):
        t = tokens.create(ctx.store, token_name)
        return t["token"], token_rows(ctx), f"Created token **{esc(t['id'])}** ({esc(t['name'])})."

    def on_revoke(token_id: str):
        revoked = tokens.revoke(ctx.store, token_id)
        return "", token_rows(ctx), f"Revoked token **{esc(token_id.strip())}** ({esc(revoked)})."

    tab.select(lambda: token_rows(ctx), None, table, api_visibility="private")
    create.click(user_error(on_create), name, [shown, table, message], api_name="create_token")
    revoke.click(user_error(on_revoke), which, [shown, table, message], api_name="revoke_token")
    return {"token_name": name, "token_new": shown, "tokens_table": table, "token_revoke": which}


__all__ = ["create_tokens_panel", "token_rows"]
