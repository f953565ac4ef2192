"""Core's English sentences (errors, skipped-row reasons) in the user's language, at the studio's edge.

Core and the CLI speak English; the studio shows their sentences through ``localize``. Every locale key under
``err.`` is one sentence: its English text (studio/locales/en.json) is the pattern, with ``{name}``
placeholders standing for the variable parts (``{{`` and ``}}`` for literal braces), and its Chinese text is the
translation, which may leave a placeholder out. A placeholder named ``why``, ``detail`` or ``kind`` holds another
sentence or phrase and is translated in turn. A sentence no pattern matches keeps
its English words behind a translated lead-in (``err.other``), so nothing is lost.

    "LoraConfig.r = 0 is invalid: must be >= 1"  ->  "LoraConfig.r = 0 无效：必须 ≥ 1"
"""

from __future__ import annotations

import re
from functools import lru_cache

from .i18n import files, lang, t

NESTED = ("why", "detail", "kind")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _literal(text: str) -> str:
    return text.replace("{{", "{").replace("}}", "}")


def _regex(template: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(_literal(template[pos:m.start()])))
        parts.append(f"(?P<{m.group(1)}>.+?)" if m.group(1) in NESTED else f"(?P<{m.group(1)}>[^\\n]+?)")
        pos = m.end()
    parts.append(re.escape(_literal(template[pos:])))
    return re.compile("".join(parts), re.DOTALL)


@lru_cache(maxsize=1)
def patterns() -> list[tuple[str, re.Pattern]]:
    """(key, compiled English template) of every ``err.`` key, the most specific (longest fixed text) first."""
    en = files()["en"]
    keys = [k for k in en if k.startswith("err.") and k != "err.other"]
    keys.sort(key=lambda k: -len(_PLACEHOLDER.sub("", en[k])))
    return [(k, _regex(en[k])) for k in keys]


def localize(text: object, lang_: str | None = None) -> str:
    """``text`` (a core or studio sentence) in the current request's language (or ``lang_``)."""
    text = str(text)
    lg = lang_ or lang()
    if lg == "en" or not text:
        return text
    return _translate(text, lg) or t("err.other", lg, detail=text)


def _translate(text: str, lg: str) -> str | None:
    for key, rx in patterns():
        m = rx.fullmatch(text.strip())
        if m:
            values = {k: (_translate(v, lg) or v) if k in NESTED else v for k, v in m.groupdict().items()}
            return t(key, lg, **values)
    return None
