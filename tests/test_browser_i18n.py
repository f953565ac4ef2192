"""The studio in Chinese (issue 13), in headless Chromium with a zh-CN locale.

A newcomer whose browser is set to Chinese goes from a bad upload to the bundled sample, a short LoRA run, the
Monitor, the Runs table and a chat with the adapter, and every screen's own text is Chinese: no run of four
English words appears outside what the user or the model wrote (the data preview, the chat answers, the worker's
log). The header's switch turns the page English and the choice survives a reload.

Screenshots of the Train tab in both languages go to test-artifacts/ (train_zh.png, train_en.png); with
PEFT_STUDIO_UPDATE_SCREENSHOT=1 they replace the README's in assets/screenshots/.
"""

import os
import re
import shutil
from pathlib import Path

import pytest

from test_browser import CHROMIUM, ROOT, studio, wait_text  # noqa: F401 - studio: the module fixture (app on a tiny model)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]
SCREENSHOTS = ROOT / "assets" / "screenshots"
ARTIFACTS = ROOT / "test-artifacts"


def train_shot(page, name: str) -> None:
    """The Train tab's screenshot in test-artifacts/; with PEFT_STUDIO_UPDATE_SCREENSHOT=1 also in assets/."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    if os.environ.get("PEFT_STUDIO_UPDATE_SCREENSHOT"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / name, SCREENSHOTS / name)
TABS_ZH = ["数据", "训练", "监控", "运行记录", "对话", "导出"]
TABS_EN = ["Data", "Train", "Monitor", "Runs", "Chat", "Export"]
#: what the user or the model wrote, and gradio's own footer: not the studio's text
NOT_OURS = ["#ps-preview", "[id^=ps-chat-]:not(#ps-chat-runs):not(#ps-chat-input)", "#ps-log", "footer",
            "#ps-model input"]
SENTENCE = re.compile(r"\b[A-Za-z][a-z']+(?:[ ,]+[A-Za-z][a-z']+){3,}")


def studio_text(page) -> str:
    """The visible text of the page without the parts listed in NOT_OURS."""
    return page.evaluate(
        """(skip) => {
            const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
            const out = [];
            while (walker.nextNode()) {
                const n = walker.currentNode, el = n.parentElement;
                if (!el || !n.textContent.trim() || skip.some(sel => el.closest(sel))) continue;
                const st = getComputedStyle(el);
                if (st.visibility === 'hidden' || st.display === 'none' || !el.getClientRects().length) continue;
                out.push(n.textContent.trim());
            }
            return out.join('\\n');
        }""",
        NOT_OURS,
    )


def assert_no_english(page, where: str) -> None:
    found = SENTENCE.findall(studio_text(page))
    assert not found, f"{where}: English in the Chinese page: {found}"


@pytest.fixture
def browser():
    pytest.importorskip("playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def open_page(browser, url: str, locale: str):
    page = browser.new_context(locale=locale, viewport={"width": 1440, "height": 1000}).new_page()
    page.goto(url)
    page.get_by_text("PEFT Studio", exact=True).first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)  # the page's load events: tables, charts and the saved language
    return page


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(800)


def test_a_chinese_browser_from_the_sample_to_a_chat(browser, studio, tmp_path):  # noqa: F811
    ctx, url, model = studio
    page = open_page(browser, url, "zh-CN")
    for name in TABS_ZH:
        page.get_by_role("tab", name=name).wait_for(timeout=10_000)
    assert_no_english(page, "Data")

    # a bad upload: the refusal is one Chinese sentence
    bad = tmp_path / "malformed.json"
    bad.write_bytes(b'[{"instruction": "a", "output": "b"}, {"instruction": ')
    page.locator("#ps-upload input[type=file]").set_input_files(str(bad))
    status = page.locator("#ps-data-status")
    status.get_by_text("不是有效的 JSON").wait_for(timeout=60_000)
    assert status.inner_text().startswith("✗")
    assert_no_english(page, "Data, after a bad upload")

    # the bundled sample
    page.get_by_role("button", name="使用示例").click()
    status.get_by_text("识别为").wait_for(timeout=60_000)
    assert_no_english(page, "Data, with the sample")

    # Train: the advisor, then a short LoRA run
    tab(page, "训练")
    page.get_by_text("不确定选哪种方法？问问顾问").click()
    page.get_by_role("button", name="推荐").click()
    page.locator("#ps-advice").get_by_text("推荐：").wait_for(timeout=20_000)
    page.get_by_label("最大步数（优化步）", exact=True).fill("6")
    page.get_by_label("批大小（样本）", exact=True).fill("4")
    page.get_by_label("学习率（每步）", exact=True).fill("0.01")
    page.get_by_label("学习率（每步）", exact=True).press("Tab")
    page.get_by_role("button", name="检查配置").click()
    page.locator("#ps-estimate").get_by_text("可训练参数").wait_for(timeout=60_000)
    assert_no_english(page, "Train")
    train_shot(page, "train_zh.png")
    page.locator("#ps-start").click()

    # Monitor
    page.locator("#ps-progress [data-status='completed']").wait_for(timeout=300_000)
    page.wait_for_timeout(1500)
    assert "已完成" in page.locator("#ps-progress").inner_text()
    assert_no_english(page, "Monitor")

    # Runs
    tab(page, "运行记录")
    wait_text(page, "#ps-runs-table", "已完成")
    assert "可训练参数" in page.locator("#ps-runs-table").inner_text()
    assert_no_english(page, "Runs")

    # Chat with the adapter
    tab(page, "对话")
    page.get_by_label("要比较的已完成运行（最多 4 个）", exact=True).click()
    page.get_by_role("option").first.click()
    page.keyboard.press("Escape")
    page.locator("#ps-chat-1").wait_for(state="visible", timeout=20_000)
    page.locator("#ps-chat-input textarea").fill("What is your name?")
    page.locator("#ps-chat-input textarea").press("Enter")
    for col in (0, 1):
        page.locator(f"#ps-latency-{col}").get_by_text("首个 token").wait_for(timeout=300_000)
    assert_no_english(page, "Chat")

    # Export
    tab(page, "导出")
    page.get_by_label("运行", exact=True).last.click()
    page.get_by_role("option").first.click()
    page.keyboard.press("Escape")
    page.locator("#ps-export-zip").click()
    page.locator("#ps-export-message").get_by_text("已打包").wait_for(timeout=60_000)
    assert_no_english(page, "Export")


def test_the_switch_changes_the_language_and_survives_a_reload(browser, studio):  # noqa: F811
    ctx, url, model = studio
    page = open_page(browser, url, "zh-CN")
    page.get_by_role("tab", name="训练").wait_for(timeout=10_000)
    page.locator("#ps-use-sample").click()  # the loaded dataset survives the switch's reload
    page.locator("#ps-data-status").get_by_text("identity_sample.json").wait_for(timeout=60_000)
    tab(page, "训练")  # and so does what the user typed in the Train form
    page.locator("#ps-train-lr input").fill("0.0123")
    page.locator("#ps-train-max_steps input").fill("7")
    page.locator("#ps-train-lr input").press("Tab")
    page.locator("#ps-lang").click()  # shows "English" on a Chinese page
    page.get_by_role("tab", name="Train").wait_for(timeout=30_000)
    page.locator("#ps-data-status").get_by_text("identity_sample.json").wait_for(timeout=60_000)
    assert "detected format" in page.locator("#ps-data-status").inner_text()  # read again, in English
    tab(page, "Train")
    assert page.locator("#ps-train-lr input").input_value() == "0.0123"
    assert page.locator("#ps-train-max_steps input").input_value() == "7"
    tab(page, "Data")
    for name in TABS_EN:
        page.get_by_role("tab", name=name).wait_for(timeout=10_000)
    page.reload()
    page.get_by_text("PEFT Studio", exact=True).first.wait_for(timeout=60_000)
    page.get_by_role("tab", name="Train").wait_for(timeout=30_000)
    assert page.get_by_role("tab", name="训练").count() == 0
    # the server answers in the chosen language too (a handler's text, not only the labels)
    tab(page, "Train")
    page.get_by_role("button", name="Check configuration").click()
    page.locator("#ps-estimate").get_by_text("Trainable parameters").wait_for(timeout=60_000)
    train_shot(page, "train_en.png")
    # and back: Chinese again, also after a reload
    page.locator("#ps-lang").click()
    page.get_by_role("tab", name="训练").wait_for(timeout=30_000)
    page.reload()
    page.get_by_text("PEFT Studio", exact=True).first.wait_for(timeout=60_000)
    page.get_by_role("tab", name="训练").wait_for(timeout=30_000)
    assert page.get_by_role("tab", name="Train").count() == 0
