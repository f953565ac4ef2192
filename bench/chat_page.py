"""Chat speed through the studio's page against core's own stream (`python -m bench.chat_page [--quick]`).

The same greedy reply to the same prompt on the default model, nothing training:

    core    ``core.generate.stream`` in this process, the model loaded here
    page    the studio (``python app.py`` in a child process) through gradio_client, exactly as the Chat tab
            calls it: /chat_send (the message into every column's history), then /chat_reply (the streamed
            answer, base column only)

ttft_s: from the call (for the page, from /chat_send) to the first visible text. tokens_per_s: the tokens after
the first one over the time after the first text. Each side runs REPEATS times after a warm-up and keeps the
median; the page's answer must be the same text as core's, or the run fails. One JSON line, "RESULT {...}".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
REPEATS = 3


def core_side(new_tokens: int) -> tuple[list[dict], str]:
    import torch

    from core.config import DEFAULT_MODEL
    from core.generate import GenerationSettings, stream
    from core.models import load_model

    model, tokenizer = load_model(DEFAULT_MODEL)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=new_tokens)
    runs, text = [], ""
    for i in range(REPEATS + 1):
        t0 = time.perf_counter()
        s = stream(model, tokenizer, None, [{"role": "user", "content": PROMPT}], settings)
        first, text = None, ""
        for delta in s:
            if first is None and delta:
                first = time.perf_counter()
            text += delta
        end = time.perf_counter()
        if i:  # the first is the warm-up
            runs.append(timing(t0, first or end, end, s.new_tokens))
    del model
    torch.set_num_threads(torch.get_num_threads())
    return runs, text


def timing(t0: float, first: float, end: float, n: int) -> dict:
    return {"ttft_s": first - t0, "tokens_per_s": max(0, n - 1) / max(end - first, 1e-9), "new_tokens": n}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_side(new_tokens: int, tokenizer) -> tuple[list[dict], str]:
    from gradio_client import Client

    port = free_port()
    data = tempfile.mkdtemp(prefix="bench-chat-")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--data-dir", data], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = wait_for(f"http://127.0.0.1:{port}/", server)
        runs, text = [], ""
        for i in range(REPEATS + 1):
            client.predict(api_name="/chat_clear")
            t0 = time.perf_counter()
            client.predict(text=PROMPT, run_ids=[], base=True, api_name="/chat_send")
            job = client.submit(temperature=0.0, top_p=0.9, max_new_tokens=new_tokens, system="",
                                merged="unmerged", api_name="/chat_reply")
            first = None
            for out in job:  # one item per streamed update
                answer = reply_text(out)
                if first is None and answer:
                    first = time.perf_counter()
            end = time.perf_counter()
            text = reply_text(job.outputs()[-1])
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if i:
                runs.append(timing(t0, first or end, end, n))
        return runs, text
    finally:
        server.terminate()
        server.wait(timeout=60)


def reply_text(outputs) -> str:
    """The base column's streamed assistant text in one /chat_reply update ('' before it starts)."""
    bot = outputs[0] or []
    last = bot[-1] if bot else None
    if not last or last.get("role") != "assistant":
        return ""
    content = last.get("content")
    if isinstance(content, list):  # gradio's message format: [{"type": "text", "text": ...}]
        content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
    import html

    return html.unescape(content or "")


def wait_for(url: str, server: subprocess.Popen, timeout_s: float = 300):
    from gradio_client import Client

    end = time.time() + timeout_s
    while time.time() < end:
        if server.poll() is not None:
            raise RuntimeError(f"the studio exited with {server.returncode} before serving {url}")
        try:
            return Client(url, verbose=False)
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise RuntimeError(f"the studio did not answer at {url} in {timeout_s:.0f} s")


def median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("ttft_s", "tokens_per_s", "new_tokens")}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.chat_page")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    new_tokens = 48 if args.quick else 128
    from core.models import load_tokenizer

    core_runs, core_text = core_side(new_tokens)
    page_runs, page_text = page_side(new_tokens, load_tokenizer())
    if page_text.strip() != core_text.strip():
        raise RuntimeError(f"the page answered differently from core:\n page: {page_text!r}\n core: {core_text!r}")
    core, page = median(core_runs), median(page_runs)
    result = {"core": core, "page": page, "same_text": True,
              "tokens_per_s_ratio": page["tokens_per_s"] / core["tokens_per_s"],
              "ttft_extra_s": page["ttft_s"] - core["ttft_s"]}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
