"""The Experiment tab in headless Chromium (tiny model): pick three methods, start, watch the leaderboard fill as
the runs end, download results.csv, and open the two best runs side by side in Chat. Harness: tests/test_browser.py.
Screenshots go to test-artifacts/ (git-ignored)."""

import csv
import time
from pathlib import Path

import pytest

from test_browser import ARTIFACTS, page, shot, studio, tab, wait_text  # noqa: F401 - shared pytest fixtures

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]
METHODS = ("lora", "bitfit", "prefix_tuning")


def view_rows(ctx) -> list[dict]:
    from studio.sweeps import experiment_view, experiments

    return experiment_view(ctx, experiments(ctx)[0][1])["rows"]


def board_text(page) -> str:
    return page.locator("#ps-exp-board").first.inner_text()


def test_experiment_leaderboard_fills_and_opens_chat(page, studio, tmp_path):  # noqa: F811
    from core.methods import spec

    ctx, url, model = studio
    tab(page, "Experiment")
    dataset = page.locator("#ps-exp-data").get_by_label("Dataset", exact=True).first
    dataset.click()
    page.get_by_role("option", name="sample · qa_sample.jsonl").first.click()
    page.keyboard.press("Escape")
    box = page.locator("#ps-exp-methods")
    for m in METHODS:
        box.get_by_label(spec(m).label, exact=True).check()
    steps = page.get_by_label("Optimiser steps per run (steps)", exact=True).first
    steps.fill("3")
    steps.press("Tab")
    page.get_by_label("Experiment name", exact=True).fill("three")
    page.locator("#ps-exp-start").click()
    page.locator("#ps-exp-message").get_by_text("Queued").wait_for(timeout=60_000)
    assert "3 runs" in page.locator("#ps-exp-message").inner_text()

    # ---- the leaderboard fills as the runs end ---------------------------------------------------------------
    seen = []
    deadline = time.time() + 600
    while time.time() < deadline:
        text = board_text(page)
        seen.append(text.count("completed"))
        if seen[-1] == len(METHODS) and "★" in text:
            break
        page.wait_for_timeout(1000)
    assert seen[-1] == len(METHODS), board_text(page)
    assert min(seen) < len(METHODS)  # it filled while we watched, not all at once at the end
    text = board_text(page)
    for m in METHODS:
        assert m in text
    assert "rouge_l" in text  # QA's task metric
    # full width: no header is so narrow that its words break inside ("me/th/od" beside the chart, before)
    widths = page.evaluate("() => [...document.querySelectorAll('#ps-exp-board th')].map(th => th.offsetWidth)")
    assert widths and min(widths) >= 40, widths
    # ---- sortable: the header menu sorts by the numbers, not their text ---------------------------------------
    by_trainable = sorted(METHODS, key=lambda m: next(r["trainable"] for r in view_rows(ctx) if r["method"] == m))
    for order, expected in (("Sort ascending", by_trainable[0]), ("Sort descending", by_trainable[-1])):
        header = page.locator("#ps-exp-board th", has_text="trainable params").first
        header.hover()
        header.get_by_role("button", name="Open cell menu").click(force=True)
        page.get_by_text(order).first.click()
        page.wait_for_timeout(800)
        assert board_text(page).split("can merge")[-1].split()[0] == expected, order
    page.locator("#ps-exp-curves .js-plotly-plot").wait_for(timeout=20_000)
    traces = page.evaluate("() => document.querySelector('#ps-exp-curves .js-plotly-plot').data.length")
    assert traces >= len(METHODS)
    advice = wait_text(page, "#ps-exp-advice", "all runs ended", 30)  # the registry has settled every run
    assert "the advisor recommends" in advice  # the verdict, rendered in the page's language
    shot(page, "tab-experiment.png")

    # ---- results.csv downloads with one row per run -----------------------------------------------------------
    with page.expect_download(timeout=30_000) as dl:
        page.locator("#ps-exp-csv").click()
    path = tmp_path / "results.csv"
    dl.value.save_as(path)
    with open(path, newline="", encoding="utf-8") as f:
        assert [r["run"] for r in csv.DictReader(f)] == list(METHODS)

    # ---- the two best runs side by side in Chat ----------------------------------------------------------------
    page.locator("#ps-exp-chat").click()
    page.locator("#ps-chat-2").wait_for(state="visible", timeout=30_000)  # base + two runs
    page.locator(".ps-col-label", has_text="three-").first.wait_for(timeout=30_000)
    labels = page.locator(".ps-col-label").all_inner_texts()
    runs = list(dict.fromkeys(lab for lab in labels if lab.startswith("three-")))  # wrapper and text: same label
    assert len(runs) == 2, labels
    from studio.sweeps import experiments, top_runs

    top = top_runs(ctx, experiments(ctx)[0][1], 2)
    assert [r.split(" ·")[0] for r in runs] == [ctx.store.get(i).name for i in top]
    shot(page, "tab-experiment-chat.png")
    assert not page.js_errors, page.js_errors  # type: ignore[attr-defined]
    assert Path(ARTIFACTS).is_dir()
