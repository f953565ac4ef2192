"""The studio in English and Chinese, through Gradio's own i18n (``gr.I18n``).

Where the strings live (one owner each):

    studio/locales/en.json, zh.json   every studio string, flat {key: text}; keys are dotted and start with the
                                      tab or module that shows them ("data.upload", "train.start", "chart.loss")
    core/methods/*.py                 method and preset labels/blurbs: label/label_zh, blurb/blurb_zh
    core config fields                knob help: knob(..., help, help_zh=...) in the field's metadata
    core/advisor.py                   the advisor's reasons and its hardware/goal labels, in both languages

The entries from core are added to the gr.I18n dictionaries here under generated keys (``method_key``,
``help_key``, ``hardware_key``, ``goal_key``), so tests/test_i18n.py can check every one has both languages.

Two ways to show a key:

    T("train.start")                 a gr.I18n key, for text built once with the page: labels, info, placeholders,
                                     tab names, button texts, static Markdown, and whole-key handler outputs
                                     (``return T("runs.nothing_deleted")``). The browser translates it.
    t("train.queued", name=..)       a str in the language of the current request, for text a handler formats
                                     at event time (status lines, errors, chart titles, table headers). Values
                                     fill the {name} placeholders (str.format) of both languages' texts.

The language is the ``ps_lang`` cookie ("en" or "zh") the header switch writes (LANG_SWITCH_JS, kept a year);
without it, the browser's own language (Accept-Language on the server, navigator.language in the page). The
middleware PageLanguage makes the page start in the cookie's language.
Outside a request (CLI, scripts, tests of actions) t() answers in English.

To add a string: put the key in both JSON files, use it as a literal in T("...") or t("...") (tests/test_i18n.py
finds keys by their literals and fails on a key missing in either language, on an unused key, and on a label or
Markdown given to a component as plain text), and run ``pytest tests/test_i18n.py``. A new tab, for example:

    en.json  "tab.experiment": "Experiment",   "experiment.start": "Start {n} runs"
    zh.json  "tab.experiment": "实验",          "experiment.start": "开始 {n} 个运行"
    with gr.Tab(T("tab.experiment"), id="experiment"): ...
    def on_start(...): return t("experiment.start", n=len(runs))

Core's English error sentences are translated at the studio's edge by studio/messages.py: an ``err.`` key whose
English text is the sentence's pattern; ``user_error`` handlers get this for free.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .security import HtmlPageRewriter

if TYPE_CHECKING:  # gradio is imported by the page only: actions, the API and the CLI use t() without it
    import gradio as gr
    from gradio.i18n import I18nData

LOCALES_DIR = Path(__file__).resolve().parent / "locales"
LANGS = ("en", "zh")
COOKIE = "ps_lang"
#: The page's locale for each language: zh-CN so that Gradio's own texts (upload box, toasts) are Chinese too;
#: our "zh" entries apply to it (and to zh-TW) through svelte-i18n's fallback from "zh-CN" to "zh".
PAGE_LOCALE = {"en": "en", "zh": "zh-CN"}


@lru_cache(maxsize=1)
def files() -> dict[str, dict[str, str]]:
    """{lang: {key: text}} as written in studio/locales/."""
    return {lang: json.loads((LOCALES_DIR / f"{lang}.json").read_text(encoding="utf-8")) for lang in LANGS}


def method_key(entry: str, part: str) -> str:
    return f"method.{entry}.{part}"


def help_key(cls: type, name: str) -> str:
    return f"help.{cls.__name__}.{name}"


def hardware_key(k: str) -> str:
    return f"hardware.{k}"


def goal_key(k: str) -> str:
    return f"goal.{k}"


@lru_cache(maxsize=1)
def generated() -> dict[str, dict[str, str]]:
    """{lang: {key: text}} of the entries core owns: method labels/blurbs, knob help, advisor labels."""
    from core.advisor import GOALS, GOALS_ZH, HARDWARE, HARDWARE_ZH
    from core.methods import menu

    from .knobs import info_text, shown_fields

    out: dict[str, dict[str, str]] = {lang: {} for lang in LANGS}
    for key, (s, p) in menu().items():
        src = p or s
        for part in ("label", "blurb"):
            out["en"][method_key(key, part)] = getattr(src, part)
            out["zh"][method_key(key, part)] = getattr(src, f"{part}_zh")
    for cls, name, f in shown_fields():
        for lg in LANGS:  # an untranslated field stays empty in Chinese: tests/test_i18n.py fails on it
            out[lg][help_key(cls, name)] = info_text(cls, name, lg) if f.metadata.get(f"help_{lg}", lg == "en") else ""
    for k in HARDWARE:
        out["en"][hardware_key(k)], out["zh"][hardware_key(k)] = HARDWARE[k], HARDWARE_ZH.get(k, "")
    for k in GOALS:
        out["en"][goal_key(k)], out["zh"][goal_key(k)] = GOALS[k], GOALS_ZH.get(k, "")
    return out


@lru_cache(maxsize=1)
def table() -> dict[str, dict[str, str]]:
    """Every translation, {lang: {key: text}}: the locale files plus the generated entries."""
    f, g = files(), generated()
    return {lang: {**g[lang], **f[lang]} for lang in LANGS}


def i18n() -> gr.I18n:
    """The gr.I18n instance handed to ``demo.launch(i18n=...)``."""
    import gradio as gr

    return gr.I18n(**table())


def T(key: str) -> I18nData:
    """A key the browser translates (labels, info, placeholders, static Markdown, button texts, tab names)."""
    from gradio.i18n import I18nData

    if key not in table()["en"]:
        raise KeyError(f"i18n key {key!r} is not in studio/locales/en.json")
    return I18nData(key)


def lang() -> str:
    """The language of the current request: the switch's cookie, else Accept-Language; "en" outside a request
    (and without gradio loaded there is no request)."""
    context = sys.modules.get("gradio.context")
    request = context.LocalContext.request.get(None) if context else None
    if request is None:
        return "en"
    headers = getattr(request, "headers", None) or {}
    try:
        cookie = SimpleCookie(headers.get("cookie", "") or "")
    except CookieError:
        cookie = SimpleCookie()
    if COOKIE in cookie and cookie[COOKIE].value in LANGS:
        return cookie[COOKIE].value
    return from_accept_language(headers.get("accept-language", "") or "")


def from_accept_language(header: str) -> str:
    """"zh" when the browser's first language that we have is Chinese, else "en"."""
    ranked = []
    for i, part in enumerate(header.split(",")):
        tag, _, q = part.strip().partition(";q=")
        try:
            ranked.append((-float(q or 1), i, tag.strip().lower()))
        except ValueError:
            continue
    for _, _, tag in sorted(ranked):
        base = tag.split("-")[0]
        if base in LANGS:
            return base
    return "en"


def t(key: str, lang_: str | None = None, /, **values: Any) -> str:
    """``key`` in the current request's language (or ``lang_``), with {placeholders} filled from ``values``."""
    own = files()  # the locale files first: the generated entries need the page's widgets (and gradio)
    tables = own if key in own["en"] else table()
    text = tables[lang_ or lang()].get(key) or tables["en"][key]
    return text.format(**values) if values else text


def choice(prefix: str, value: object) -> str:
    """A value from a list core owns (a run status, a data format) in the current language: the key
    ``<prefix>.<value>``; tests/test_i18n.py checks every prefix in DYNAMIC against its owner's list."""
    key = f"{prefix}.{value}"
    return t(key) if key in table()["en"] else str(value)


#: Key prefixes filled from a list core or the studio owns (checked against it by the tests): run statuses and data
#: formats and the Experiment leaderboard's columns (``choice``), and the labels of config fields shown as widgets
#: (``field.<name>``, studio.knobs).
DYNAMIC = ("status", "format", "field", "board")


#: Put first in every page's <head> (PageLanguage): before Gradio's module scripts run, the switch's choice (the
#: cookie) replaces the browser's language, so the page is built in it from the start. Without the cookie the
#: browser's own language stays.
PAGE_LANG_SCRIPT = ("<script>(function(){var m=document.cookie.match(/(?:^|; )%s=(en|zh)/);if(!m)return;"
                    "var l=%s[m[1]];try{Object.defineProperty(Navigator.prototype,'language',{get:function(){return l},"
                    "configurable:true});Object.defineProperty(Navigator.prototype,'languages',{get:function(){"
                    "return [l]},configurable:true})}catch(e){}})();</script>") % (COOKIE, json.dumps(PAGE_LOCALE))


class PageLanguage(HtmlPageRewriter):
    """Middleware: PAGE_LANG_SCRIPT at the top of every HTML page."""

    def rewrite(self, data: bytes) -> bytes:
        return data.replace(b"<head>", b"<head>" + PAGE_LANG_SCRIPT.encode(), 1)


#: The header's switch: the other language, remembered in a cookie for a year; the page reloads in it.
LANG_SWITCH_JS = """
() => {
  const next = document.documentElement.lang.startsWith('zh') ? 'en' : 'zh';
  document.cookie = '%s=' + next + '; path=/; max-age=31536000; SameSite=Lax';
  setTimeout(() => location.reload(), 300);  // after the page has stored what it keeps (gr.BrowserState)
}
""" % COOKIE
