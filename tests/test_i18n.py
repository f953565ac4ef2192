"""The studio in English and Chinese (issue 13): every key in both languages and used, the registry's Chinese
labels, no user-facing literal that bypasses studio.i18n, core's sentences translated at the edge, and the
language taken from the switch's cookie or the browser."""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

import pytest
from gradio.context import LocalContext

from core.advisor import GOALS, HARDWARE, recommend
from core.data import FORMATS
from core.methods import menu
from studio import i18n, messages
from studio.knobs import shown_fields
from studio.store import STATUSES
from studio.sweeps import TABLE

ROOT = Path(__file__).resolve().parent.parent
STUDIO = ROOT / "studio"
UI_FILES = [STUDIO / "ui.py", *sorted((STUDIO / "tabs").glob("*.py"))]
CJK = re.compile(r"[\u4e00-\u9fff]")
PROSE = re.compile(r"(?<![-\w./])[A-Za-z]{2,} [A-Za-z]{2,}(?![-\w])")  # two English words: a sentence's start


def placeholders(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


def literals(files) -> set[str]:
    out = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
    return out


def test_every_key_has_both_languages_and_no_unknown_placeholder():
    en, zh = i18n.files()["en"], i18n.files()["zh"]
    assert set(en) == set(zh), f"only in en: {set(en) - set(zh)}; only in zh: {set(zh) - set(en)}"
    for k in en:
        assert en[k].strip() and zh[k].strip(), k
        assert placeholders(zh[k]) <= placeholders(en[k]), k  # a translation may leave a value out
    g = i18n.generated()
    for k in g["en"]:
        assert g["en"][k].strip() and CJK.search(g["zh"][k]), f"{k} has no Chinese text"


def test_every_key_is_used_and_every_used_key_exists():
    en = i18n.files()["en"]
    code = literals(STUDIO.rglob("*.py"))
    sources = "\n".join(p.read_text(encoding="utf-8") for d in ("core", "studio") for p in (ROOT / d).rglob("*.py"))
    sources = re.sub(r"[\"']\s*\n\s*f?[\"']", "", sources)  # adjacent literals split over lines, joined
    dynamic = tuple(f"{p}." for p in i18n.DYNAMIC)
    for k in en:
        if k == "err.other":
            continue
        if k.startswith("err."):  # a pattern: its fixed parts are written in core or studio (or t() uses it)
            pieces = [p.strip(" .:;()") for frag in re.split(r"\{\w+\}", en[k]) for p in frag.split("; ")]
            missing = [p for p in pieces if len(p) >= 6 and p not in sources]
            assert k in code or not missing, f"{k}: no sentence like {missing}"
        elif not k.startswith(dynamic):
            assert k in code, f"{k} is never used in studio/"
    # the other direction: every literal handed to T() / t() / choice() is a key
    for f in STUDIO.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("T", "t") and node.args
                    and isinstance(node.args[0], ast.Constant)):
                assert node.args[0].value in i18n.table()["en"], f"{f.name}: unknown key {node.args[0].value!r}"


def test_lists_owned_elsewhere_have_exactly_their_keys():
    en = i18n.files()["en"]
    owners = {"status": STATUSES, "format": FORMATS, "field": {name for _, name, _ in shown_fields()},
              "board": [col for _, col in TABLE]}
    assert set(owners) == set(i18n.DYNAMIC)
    for prefix, values in owners.items():
        assert {k.split(".", 1)[1] for k in en if k.startswith(prefix + ".")} == set(values), prefix


def test_every_method_and_preset_has_a_chinese_label_and_blurb_in_the_seed_terms():
    for key, (s, p) in menu().items():
        src = p or s
        assert CJK.search(src.blurb_zh) and src.label_zh.strip(), key
    zh = {k: v for k, v in i18n.generated()["zh"].items() if k.startswith("method.")}
    text = " ".join(zh.values())
    for term in ("全参数微调", "分层微调", "学习率调度（LLRD", "加性微调", "重参数化微调", "前缀调控", "选择性微调"):
        assert term in text, term


def test_the_advisor_gives_every_reason_in_chinese_too():
    for rows in (50, 500, 5_000, 50_000):
        for hw in HARDWARE:
            for goal in GOALS:
                a = recommend(rows, hw, goal)
                assert len(a.reasons_zh) == len(a.reasons) and all(CJK.search(r) for r in a.reasons_zh)
                assert len(a.alternative_methods) == len(a.alternatives)


GR_TEXT_KWARGS = {"label", "info", "placeholder"}
GR_TEXT_FIRST_ARG = {"Markdown", "Button", "Tab", "Accordion", "HTML", "Code"}
NOT_SHOWN = {"elem_id", "elem_classes", "api_name", "variant", "language", "api_visibility", "show_progress",
             "type", "size", "file_count", "js", "selected", "id"}


BRAND = "PEFT Studio"


def _exempt(node: ast.AST, parents: dict) -> bool:
    """Sentences that reach the user through studio.messages (raised errors), server logs, and the login page's
    message (gradio's page before the studio, shown with --auth only)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("exception", "warning", "info"):
            return True
        if isinstance(node, ast.Dict) and any(getattr(k, "value", "") == "auth_message" for k in node.keys):
            return True
    return False


def _kwarg_of(node: ast.AST, parents: dict) -> str | None:
    """The keyword (of the nearest enclosing call) a node is the value of, if any."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.keyword):
            return parent.arg
        if isinstance(parent, ast.Call):
            return None
        node = parent
    return None


def test_no_user_facing_literal_bypasses_the_mechanism():
    """Statically: gradio components get their labels, help, placeholders and static texts as keys, and no
    literal English sentence is left in the studio's UI files (docstrings, logs and ids aside)."""
    problems = []
    for f in UI_FILES:
        tree = ast.parse(f.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    getattr(node.func.value, "id", "") == "gr":
                texts = [kw.value for kw in node.keywords if kw.arg in GR_TEXT_KWARGS]
                if node.func.attr in GR_TEXT_FIRST_ARG:
                    texts += node.args[:1] + [kw.value for kw in node.keywords if kw.arg == "value"]
                for v in texts:
                    if isinstance(v, ast.JoinedStr) or (isinstance(v, ast.Constant) and isinstance(v.value, str)
                                                        and re.search("[A-Za-z]{2}", v.value)):
                        problems.append(f"{f.name}:{v.lineno} gr.{node.func.attr} gets a literal text")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = re.sub(r"<[^>]*(>|$)", " ", node.value).replace(BRAND, "")
                if PROSE.search(text) and _kwarg_of(node, parents) not in NOT_SHOWN and not _exempt(node, parents):
                    problems.append(f"{f.name}:{node.lineno} literal {node.value[:50]!r}")
    assert not problems, "\n".join(problems)


# ---- core's sentences at the edge, and the request's language -------------------------------------------------


@pytest.mark.parametrize("sentence, expected", [
    ("LoraConfig.r = 0 is invalid: must be >= 1", "LoraConfig.r = 0 无效：必须 ≥ 1"),
    ("TrainConfig.scheduler = 'x' is invalid: choose one of 'constant', 'linear', 'cosine'",
     "TrainConfig.scheduler = 'x' 无效：可选值：'constant', 'linear', 'cosine'"),
    ("missing field 'output'", "缺少字段 'output'"),
    ("bad.txt: only .json, .jsonl, .csv and .parquet files can be uploaded.",
     "bad.txt：只能上传 .json、.jsonl、.csv 和 .parquet 文件。"),
])
def test_core_sentences_are_translated_by_pattern(sentence, expected):
    assert messages.localize(sentence, "zh") == expected
    assert messages.localize(sentence, "en") == sentence  # English stays core's own sentence


def test_an_unknown_sentence_keeps_its_words_behind_a_chinese_lead_in():
    assert messages.localize("a brand new failure", "zh") == "出错了：a brand new failure"


def test_every_bad_upload_message_has_its_own_translation(tmp_path):
    """The Data tab's refusals (the cases of test_studio_api's BAD_UPLOADS): none falls back to err.other."""
    from core.data import DataError
    from core.models import load_tokenizer
    from studio.datasets import inspect

    cases = {
        "malformed.json": b'[{"instruction": "a", "output": "b"}, {"instruction": ',
        "wrong_fields.json": b'[{"foo": 1, "bar": 2}, {"foo": 1, "bar": 2}]',
        "empty.jsonl": b"",
        "binary.json": bytes(range(256)) * 8,
        "latin1.jsonl": '{"text": "caf\xe9"}\n'.encode("latin-1"),
        "not_a_list.json": b'{"instruction": "a", "output": "b"}',
    }
    failures = []
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            inspect(path, name, load_tokenizer(), 64, 10 * 2**20)
        zh = messages.localize(str(e.value), "zh")
        failures.append((name, str(e.value), zh)) if zh.startswith("出错了") or not CJK.search(zh) else None
    assert not failures, failures


class FakeRequest:
    def __init__(self, headers):
        self.headers = headers


@pytest.mark.parametrize("headers, expected", [
    ({}, "en"),
    ({"accept-language": "zh-CN,zh;q=0.9,en;q=0.8"}, "zh"),
    ({"accept-language": "fr-FR,en;q=0.5,zh;q=0.4"}, "en"),
    ({"accept-language": "zh-CN", "cookie": "a=1; ps_lang=en"}, "en"),  # the switch wins over the browser
    ({"accept-language": "en-US", "cookie": "ps_lang=zh"}, "zh"),
])
def test_language_of_a_request(headers, expected):
    token = LocalContext.request.set(FakeRequest(headers))
    try:
        assert i18n.lang() == expected
        assert i18n.t("tab.train") == {"en": "Train", "zh": "训练"}[expected]
    finally:
        LocalContext.request.reset(token)
    assert i18n.lang() == "en"  # outside a request (CLI, scripts)


def test_chart_depth_labels_follow_the_page_language():
    from studio import charts

    events = [{"type": "start", "num_layers": 2}, {"type": "step", "step": 1, "loss": 1.0,
              "lr": {"embed": 1e-4, "block 0": 2e-4, "head": 3e-4}, "lr_by_depth": {"-1": 1e-4, "0": 2e-4, "2": 3e-4},
              "grad_norm": {"block 1": 0.5, "embed": 0.2, "total": 1}}]
    token = LocalContext.request.set(FakeRequest({"cookie": "ps_lang=zh"}))
    try:
        assert list(charts.grad_heatmap(events).data[0].y) == ["词嵌入", "第 1 层"]
        assert list(charts.lr_depth_figure(events).data[0].x) == ["词嵌入", "第 0 层", "输出头"]
        assert [d.name for d in charts.lr_groups_figure(events).data] == ["词嵌入", "第 0 层", "输出头"]
    finally:
        LocalContext.request.reset(token)
    assert list(charts.grad_heatmap(events).data[0].y) == ["embeddings", "block 1"]
