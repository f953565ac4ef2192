"""build_app(ctx) -> gr.Blocks: a header (logo, base model, language switch) and seven tabs, each built by its own
function in studio/tabs/ (LLaMA-Factory style: ``create_x_tab(ctx, shared) -> dict[str, Component]``, events wired at the
bottom of each builder).

``shared`` holds the few components more than one tab uses: the base-model box, the session's dataset
(gr.State, per browser session), the id of the run this session started last (gr.State, which the Monitor
follows), and the Tabs container. Nothing lives in module globals: server-side services are on ``ctx``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from starlette.middleware import Middleware
from starlette.routing import Mount

from .api import PREFIX as API_PREFIX
from .api import WithParent, build_api
from .context import StudioContext
from .i18n import LANG_SWITCH_JS, PageLanguage, T, i18n
from .security import HideApiInfoWhenLoggedOut, LoginThrottle, ThrottleLogins
from .tabs.chat import create_chat_tab
from .tabs.common import default_run, run_choices
from .tabs.data import create_data_tab
from .tabs.experiment import create_experiment_tab, wire_chat
from .tabs.export import create_export_tab
from .tabs.monitor import create_monitor_tab
from .tabs.runs import create_runs_tab
from .tabs.train import create_train_tab

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CSS_PATH = ASSETS / "studio.css"
LOGO_PATH = ASSETS / "logo.svg"


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate",
                          font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _header() -> str:
    logo = LOGO_PATH.read_text(encoding="utf-8") if LOGO_PATH.exists() else ""
    return (f"<div class='ps-header'><div class='ps-logo'>{logo}</div><div><div class='ps-title'>PEFT Studio</div>"
            f"<div class='ps-subtitle'>{T('header.subtitle')}</div>"
            "</div></div>")


def build_app(ctx: StudioContext) -> gr.Blocks:
    with gr.Blocks(title="PEFT Studio") as demo:
        with gr.Row(equal_height=True, elem_classes="ps-top"):
            gr.HTML(_header())
            model = gr.Textbox(ctx.default_model, label=T("header.model"), info=T("header.model_info"),
                               elem_id="ps-model", scale=0, min_width=360)
            switch = gr.Button(T("header.switch"), size="sm", scale=0, min_width=90, elem_id="ps-lang")
        shared: dict[str, Any] = {
            "model": model,
            "dataset": gr.State(None),
            "monitor_run": gr.State(None),  # the run this session started last; the Monitor follows it
            # the Train form as the language switch left it, read back once by the reloaded page (made here, outside
            # the tabs: a browser state in a tab not yet opened is not read when the page loads)
            "kept_form": gr.BrowserState(None, storage_key="peft-studio-train-form", secret=ctx.browser_secret),
            "apis": [],  # (fn, api_name) of API-only endpoints, registered after the tabs
            "on_load": [],  # (fn, inputs, outputs) run when a page loads: its language's texts, its dataset
            "on_switch": [],  # (fn, outputs, event kwargs) run before the language switch reloads the page
        }
        with gr.Tabs(selected="data") as tabs:
            shared["tabs"] = tabs
            shared["data_tab"] = create_data_tab(ctx, shared)
            shared["train_tab"] = create_train_tab(ctx, shared)
            shared["monitor_tab"] = create_monitor_tab(ctx, shared)
            shared["experiment_tab"] = create_experiment_tab(ctx, shared)
            shared["runs_tab"] = create_runs_tab(ctx, shared)
            shared["chat_tab"] = create_chat_tab(ctx, shared)
            shared["export_tab"] = create_export_tab(ctx, shared)
        wire_chat(ctx, shared)  # Experiment -> Chat: both tabs exist now

        for fn, name in shared["apis"]:
            gr.api(fn, api_name=name)
        for fn, inputs, outputs in shared["on_load"]:
            demo.load(fn, inputs, outputs, api_visibility="private")
        event = None  # what the tabs keep first (in the browser), then the reload in the other language
        for fn, outputs, kwargs in shared["on_switch"]:
            event = (event.then if event else switch.click)(fn, None, outputs, api_visibility="private", **kwargs)
        (event.then if event else switch.click)(None, js=LANG_SWITCH_JS)
        # A (re)loaded page re-attaches to the running job: the Monitor shows it at once.
        demo.load(lambda: gr.update(choices=run_choices(ctx), value=default_run(ctx)), None,
                  shared["monitor_tab"]["run"], api_visibility="private")
    demo.studio_shared = shared  # type: ignore[attr-defined]  # for tests that inspect the layout
    return demo


def launch_options(ctx: StudioContext, auth: tuple[str, str] | None = None,
                   throttle: LoginThrottle | None = None) -> dict[str, Any]:
    """Keyword arguments for ``demo.launch`` that every entry point uses (app.py and the tests): the theme, the
    translations, auth, and the JSON API (studio.api) mounted at /api/v1 under the same auth. Every page starts in
    the language switch's choice (PageLanguage). With auth, failed sign-ins on the page and on the API are throttled
    per address by one LoginThrottle (``throttle``, default LoginThrottle())."""
    throttle = throttle or LoginThrottle()
    app_kwargs: dict[str, Any] = {"routes": [Mount(API_PREFIX, app=WithParent(build_api(ctx, auth, throttle)))],
                                  "openapi_url": None}  # FastAPI's schema of gradio's routes: ours is at /api/v1
    middleware = [Middleware(PageLanguage)]
    if auth:
        middleware += [Middleware(HideApiInfoWhenLoggedOut), Middleware(ThrottleLogins, throttle=throttle)]
    app_kwargs["middleware"] = middleware
    return {
        "theme": theme(),
        "i18n": i18n(),
        "css_paths": [CSS_PATH] if CSS_PATH.exists() else None,
        "auth": auth,
        "auth_message": "PEFT Studio: sign in with the user name and password given to --auth." if auth else None,
        "max_file_size": ctx.max_upload_bytes * 2,
        "allowed_paths": [str(ctx.exports_dir)],
        "show_error": False,
        "favicon_path": str(LOGO_PATH) if LOGO_PATH.exists() else None,
        "app_kwargs": app_kwargs,
        "run_history": False,  # gradio's run history (uploads to a Hub bucket) is not part of the studio
    }
