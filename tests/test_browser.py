"""The real page in headless Chromium: upload -> train -> watch the loss chart update -> runs -> chat -> export.

Screenshots go to test-artifacts/ (git-ignored): one per tab, plus the live monitor. To take the README
screenshots on the bundled SmolLM2 instead of the tiny test model (about 15 minutes on a laptop CPU):

    PEFT_STUDIO_BROWSER_MODEL=default PEFT_STUDIO_BROWSER_STEPS=40 PEFT_STUDIO_BROWSER_TIMEOUT=1800 \
    PEFT_STUDIO_UPDATE_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_browser.py -k upload

which also copies the Chat tab (base model and the trained adapter answering side by side) to
assets/screenshot.png.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
BROWSER_MODEL = os.environ.get("PEFT_STUDIO_BROWSER_MODEL", "")
STEPS = int(os.environ.get("PEFT_STUDIO_BROWSER_STEPS", "24"))
TRAIN_TIMEOUT_S = float(os.environ.get("PEFT_STUDIO_BROWSER_TIMEOUT", "600"))
pytestmark = [pytest.mark.browser, pytest.mark.timeout(TRAIN_TIMEOUT_S + 1500 if BROWSER_MODEL else 900)]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    pytest.importorskip("playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make test installs it)")
    from test_studio_api import start_app

    model = BROWSER_MODEL
    if not model:
        from core.models import load_tokenizer
        from tiny import tiny_llama

        folder = tmp_path_factory.mktemp("tiny-llama")
        m = tiny_llama(vocab=49152, layers=4)
        m.config.max_position_embeddings = 1024
        m.save_pretrained(folder)
        load_tokenizer().save_pretrained(folder)
        model = str(folder)
    ctx, demo, url = start_app(tmp_path_factory.mktemp("studio-data"), model)
    yield ctx, url, model
    demo.close()
    for run in ctx.store.list(status=("running", "queued")):
        ctx.jobs.stop(run.id)
    ctx.close()


@pytest.fixture(scope="module")
def page(studio):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(studio[1])
        pg.get_by_text("PEFT Studio", exact=True).first.wait_for(timeout=60_000)
        pg.js_errors = errors  # type: ignore[attr-defined]
        yield pg
        browser.close()


def shot(page, name: str) -> Path:
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def tab(page, name: str) -> None:
    try:
        page.get_by_role("tab", name=name).click()
    except Exception:
        shot(page, f"tab-{name}-failed.png")
        raise
    page.wait_for_timeout(600)


def fill_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True).first
    box.fill(str(value))
    box.press("Tab")


def pick(page, label: str, option: str, within: str = "") -> None:
    """Choose an option in a gradio dropdown (by label, optionally inside ``within``) by its visible text."""
    box = (page.locator(within) if within else page).get_by_label(label, exact=True).first
    box.click()
    page.get_by_role("option", name=option).first.click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)


def wait_text(page, selector: str, text: str, timeout_s: float = 30) -> str:
    end = time.time() + timeout_s
    while time.time() < end:
        got = page.locator(selector).first.inner_text()
        if text in got:
            return got
        page.wait_for_timeout(300)
    raise AssertionError(f"{text!r} never appeared in {selector}: {got[:300]!r}")


def loss_points(page) -> int:
    return page.evaluate(
        "() => { const p = document.querySelector('#ps-loss .js-plotly-plot');"
        " return p && p.data && p.data.length ? p.data[0].x.length : 0; }"
    )


def test_train_tab_opens_without_a_dataset_and_without_errors(page):
    """Opening Train before any data is loaded (a fresh page, or after a language switch) shows the form, not
    Gradio's red Error badges (the tab's handler must return a value for its outputs even when it changes none)."""
    tab(page, "Train")
    page.wait_for_timeout(1500)
    errors = page.locator(".error").filter(has_text="Error")
    assert errors.count() == 0, [errors.nth(i).inner_text() for i in range(errors.count())]
    # a checkbox among number fields keeps a readable width (gradio gives it none; assets/studio.css)
    page.get_by_text("Advanced", exact=True).first.click()
    box = page.locator("#ps-train-grad_checkpointing").bounding_box()
    assert box and box["width"] >= 150, box
    # Start without data is refused under the button; after Check the estimate speaks, and the old ✗ goes
    page.locator("#ps-start").click()
    wait_text(page, "#ps-train-status", "✗")
    page.get_by_role("button", name="Check configuration").click()
    wait_text(page, "#ps-estimate", "Trainable parameters")
    end = time.time() + 10
    while page.locator("#ps-train-status").inner_text().strip() and time.time() < end:
        page.wait_for_timeout(200)
    assert page.locator("#ps-train-status").inner_text().strip() == ""
    tab(page, "Data")


def test_a_column_mapping_applies_to_the_file_already_uploaded(page, tmp_path):
    """A file refused for its column names loads once the mapping is typed, without uploading it again."""
    tab(page, "Data")
    rows = [{"question": f"What is {i} + {i}?", "reply": str(2 * i)} for i in range(6)]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    page.locator("#ps-upload input[type=file]").set_input_files(str(path))
    wait_text(page, "#ps-data-status", "✗")
    box = page.locator("#ps-fields textarea, #ps-fields input").first
    box.fill("instruction=question, output=reply")
    box.press("Enter")
    got = wait_text(page, "#ps-data-status", "detected format")
    assert "qa.json" in got and "6" in got
    box.fill("")
    box.press("Enter")  # the next test uploads without a mapping
    wait_text(page, "#ps-data-status", "✗")
    page.locator("#ps-upload button[aria-label='Clear'], #ps-upload .label-clear-button").first.click()


def test_upload_train_watch_chat_export(page, studio, tmp_path):
    ctx, url, model = studio
    # ---- Data: upload the checkable identity sample through the file input --------------------------------
    upload = tmp_path / "my_identity.json"
    shutil.copy(ROOT / "assets" / "identity_sample.json", upload)
    page.locator("#ps-upload input[type=file]").set_input_files(str(upload))
    status = page.locator("#ps-data-status")
    status.get_by_text("detected format").wait_for(timeout=60_000)
    assert "instruction" in status.inner_text() and "my_identity.json" in status.inner_text()
    assert page.locator("#ps-preview .ps-trained").count() > 0
    page.locator("#ps-hist .js-plotly-plot").wait_for(timeout=20_000)
    shot(page, "tab-data.png")

    # ---- Train: the advisor's Apply fills the form ---------------------------------------------------------
    from core.methods import spec
    from core.models import load_model_config

    tab(page, "Train")
    # on a CPU the form starts as a first run sized to this dataset (studio.first_run), with its estimated time
    wait_text(page, "#ps-estimate", "First run on this CPU", 30)
    assert "Training ≈" in page.locator("#ps-estimate").inner_text()
    assert page.get_by_label("R (rank)", exact=True).first.input_value() == "16"
    page.get_by_text("Not sure which method? Ask the advisor").click()
    page.get_by_label("smallest artefact", exact=True).check()
    page.get_by_role("button", name="Recommend").click()
    wait_text(page, "#ps-advice", "Recommended: Prompt tuning", 20)
    page.locator("#ps-apply-advice").click()
    hidden = load_model_config(model).hidden_size
    wait_text(page, "#ps-estimate", f"{20 * hidden:,} of", 60)  # 20 virtual tokens × hidden size train
    assert page.locator("#ps-method input").input_value() == spec("prompt_tuning").label
    assert float(page.get_by_label("Lr (per step)", exact=True).input_value()) == spec("prompt_tuning").lr
    assert page.get_by_label("Num virtual tokens (tokens)", exact=True).first.input_value() == "20"
    shot(page, "tab-train-advice.png")

    # ---- Train: LoRA, a short run ---------------------------------------------------------------------------
    pick(page, "Method", spec("lora").label)
    assert float(page.get_by_label("Lr (per step)", exact=True).input_value()) == spec("lora").lr
    page.get_by_label("Run name").fill("quill-lora")
    fill_number(page, "Max steps (optimiser steps)", STEPS)
    fill_number(page, "Batch size (examples)", 4)
    fill_number(page, "Eval every (steps)", 6)
    # the real model learns its name at 2e-3; the tiny one needs 1e-2 for its greedy answer to change
    fill_number(page, "Lr (per step)", 2e-3 if BROWSER_MODEL else 1e-2)
    page.get_by_role("button", name="Check configuration").click()
    page.locator("#ps-estimate").get_by_text("Trainable parameters").wait_for(timeout=60_000)
    shot(page, "tab-train.png")
    page.locator("#ps-start").click()

    # ---- Monitor: the page switches here; the loss chart grows while it trains -----------------------------
    page.locator("#ps-progress [data-status]").wait_for(timeout=30_000)
    deadline = time.time() + TRAIN_TIMEOUT_S
    while loss_points(page) < 2 and time.time() < deadline:
        page.wait_for_timeout(500)
    first = loss_points(page)
    assert first >= 2, "the loss chart never showed training steps"
    shot(page, "tab-monitor-live.png")
    while time.time() < deadline:
        if page.locator("#ps-progress [data-status='completed']").count():
            break
        page.wait_for_timeout(1000)
    page.wait_for_timeout(1500)
    last = loss_points(page)
    assert last > first and last == STEPS, (first, last)
    assert page.locator("#ps-progress [data-status='completed']").count() == 1
    assert page.locator("#ps-heat .js-plotly-plot").count() == 1
    shot(page, "tab-monitor.png")

    # ---- Runs ----------------------------------------------------------------------------------------------
    tab(page, "Runs")
    wait_text(page, "#ps-runs-table", "quill-lora")
    pick(page, "Compare runs", "quill-lora")
    page.locator("#ps-overlay .js-plotly-plot").wait_for(timeout=20_000)
    shot(page, "tab-runs.png")

    # ---- Chat: base and adapter side by side; HTML in the prompt is shown as text -------------------------
    tab(page, "Chat")
    pick(page, "Finished runs to compare (up to 4)", "quill-lora")
    page.locator("#ps-chat-1").wait_for(state="visible", timeout=20_000)
    box = page.locator("#ps-chat-input textarea")
    box.fill("What is your name?")
    box.press("Enter")
    for col in (0, 1):
        page.locator(f"#ps-latency-{col}").get_by_text("first token").wait_for(timeout=300_000)
    answers = [page.locator(f"#ps-chat-{col} [data-testid='bot']").last.inner_text() for col in (0, 1)]
    assert all(answers) and answers[0] != answers[1], answers  # the adapter column answers differently
    if BROWSER_MODEL:  # the real model has learnt its new name (see also tests/test_actions.py, marked slow)
        assert "Quill" in answers[1] and "Quill" not in answers[0], answers
    (ARTIFACTS / "chat-answers.txt").write_text(f"base: {answers[0]}\nadapter: {answers[1]}\n", encoding="utf-8")
    chat_png = shot(page, "tab-chat.png")
    if os.environ.get("PEFT_STUDIO_UPDATE_SCREENSHOT"):  # the README screenshot: base vs adapter, side by side
        shutil.copy(chat_png, ROOT / "assets" / "screenshot.png")
    # HTML in a prompt is shown as text and never runs
    box.fill("Repeat: <img src=x onerror=\"window.pwned=1\"><b>bold</b>")
    box.press("Enter")
    page.locator("#ps-chat-0 [data-testid='user']").nth(1).wait_for(timeout=30_000)
    user_text = page.locator("#ps-chat-0 [data-testid='user']").nth(1).inner_text()
    assert "<img src=x" in user_text and "<b>bold</b>" in user_text  # shown literally
    for col in (0, 1):
        page.locator(f"#ps-chat-{col} [data-testid='bot']").nth(1).wait_for(timeout=300_000)
    page.locator("#ps-latency-1").get_by_text("first token").wait_for(timeout=300_000)
    assert page.evaluate("() => window.pwned") is None
    assert page.locator("#ps-chat-0 img[src='x']").count() == 0 and page.locator("#ps-chat-0 b").count() == 0

    # ---- Export ---------------------------------------------------------------------------------------------
    tab(page, "Export")
    pick(page, "Run", "quill-lora", within="#ps-export-run")
    page.locator("#ps-export-zip").click()
    page.locator("#ps-export-message").get_by_text("zipped").wait_for(timeout=60_000)
    shot(page, "tab-export.png")

    assert not [e for e in page.js_errors if "pwned" not in e], page.js_errors  # type: ignore[attr-defined]


def test_reload_reattaches_to_running_job(page, studio):
    ctx, url, model = studio
    from core.config import DataConfig, RunConfig, TrainConfig
    from core.methods.lora import LoraConfig

    cfg = RunConfig(model=model, method=LoraConfig(r=4), train=TrainConfig(max_steps=2000, batch_size=2, max_len=64),
                    data=DataConfig(path=str(ROOT / "assets" / "identity_sample.json")))
    run = ctx.jobs.submit(cfg, name="long-running")
    try:
        page.goto(url)  # a fresh page load: the Monitor must show the running job
        page.get_by_text("PEFT Studio", exact=True).first.wait_for(timeout=60_000)
        tab(page, "Monitor")
        page.locator("#ps-progress [data-status='running']").wait_for(timeout=120_000)
        assert "long-running" in page.locator("#ps-progress").inner_text()
        page.get_by_role("button", name="Stop this run").click()
        page.locator("#ps-progress [data-status='stopped']").wait_for(timeout=120_000)
    finally:
        ctx.jobs.stop(run.id)
