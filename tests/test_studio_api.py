"""The studio's handlers, driven through gradio_client against a running app on a tiny model with the real worker.

A tiny Llama (vocab 49152, so the cached SmolLM2 tokenizer fits) is saved to a temporary folder and used as the
base model; the bundled identity sample is the dataset. Every tab's endpoints are exercised: upload (good and
bad files), check, start, monitor, runs, chat side by side, export. Plus auth on every route, and app.py's
refusal to expose the studio without auth.
"""

import json
import re
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from core.schedules import lr_multiplier
from studio import charts
from studio.context import StudioContext
from studio.datasets import EXTENSIONS
from studio.ui import build_app, launch_options

from conftest import tiny_model_dir  # noqa: F401  (the fixture lives in conftest; tests/soak.py imports it from here)

ROOT = Path(__file__).resolve().parent.parent
UPLOAD_LIMIT = 256 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir, model, auth=None, throttle=None):
    ctx = StudioContext.create(data_dir, default_model=model, max_upload_bytes=UPLOAD_LIMIT)
    demo = build_app(ctx)
    port = free_port()
    demo.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(ctx, auth, throttle))
    return ctx, demo, f"http://127.0.0.1:{port}/"


def stop_app(ctx, demo) -> None:
    """Undo start_app: close the server, ask any run still queued or running to stop, close the context."""
    demo.close()
    for run in ctx.store.list(status=("running", "queued")):
        ctx.jobs.stop(run.id)
    ctx.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    ctx, demo, url = start_app(tmp_path_factory.mktemp("studio-data"), tiny_model_dir)
    yield ctx, url
    stop_app(ctx, demo)


@pytest.fixture
def client(app):
    return Client(app[1], verbose=False)


def english(label) -> str:
    """A component's label as the API describes it (a studio.i18n key) in English."""
    from studio.i18n import table

    if isinstance(label, dict) and "key" in label:
        return table()["en"][label["key"]]
    if isinstance(label, str) and label.startswith("__i18n__"):
        return table()["en"][json.loads(label[len("__i18n__"):])["key"]]
    return label


def call(client: Client, api: str, overrides: dict | None = None, **kw):
    """Call an endpoint filling every parameter with its UI default, overriding some by component label."""
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api]
    args = []
    for p in info["parameters"]:
        label = english(p.get("label") or "")
        if overrides and label in overrides:
            args.append(overrides[label])
        elif p["parameter_name"] in kw:
            args.append(kw[p["parameter_name"]])
        else:
            args.append(p.get("parameter_default"))
    return client.predict(*args, api_name=api)


# lr 1e-2: six LoRA steps are then enough to change the tiny model's greedy answer (checked in the chat test)
TRAIN = {"Max steps (optimiser steps)": 6, "Batch size (examples)": 4, "Eval every (steps)": 3, "Lr (per step)": 1e-2,
         "Max length (tokens)": 128}


def load_sample(client, model):
    return client.predict("identity_sample.json", model, 128, api_name="/use_sample")


def text_of(message: dict) -> str:
    """A chatbot message's text (gradio 6 sends content as a list of typed parts)."""
    c = message["content"]
    return c if isinstance(c, str) else "".join(part.get("text", "") for part in c if part.get("type") == "text")


def start(client, app, name, overrides=None):
    """Start a run through the Train tab's handler; returns (status message, run id)."""
    status, *_ = call(client, "/start_run", {**TRAIN, **(overrides or {}), "Run name": name})
    assert status.startswith("✓"), status
    return status, next(r.id for r in app[0].store.list() if r.name == name)


def wait_status(client, run_id, done=("completed", "stopped", "failed", "interrupted"), timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        st = client.predict(run_id, api_name="/run_status")
        if st["status"] in done:
            return st
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish: {st}")


# ---- pure chart functions ----------------------------------------------------------------------------------


def test_charts_from_events():
    events = [{"type": "start", "num_layers": 2}] + [
        {"type": "step", "step": i, "loss": 3.0 / i, "lr": {"block 0": 1e-4 * 0.9, "block 1": 1e-4},
         "lr_by_depth": {"0": 0.9e-4, "1": 1e-4, "-1": 0.81e-4}, "grad_norm": {"block 1": 0.5, "block 0": 0.2, "total": 1}}
        for i in range(1, 6)
    ] + [{"type": "eval", "step": 5, "eval_loss": 0.8}]
    loss = charts.loss_figure(events, log_scale=True)
    assert [t.name for t in loss.data] == ["train (raw)", "train (EMA 0.9)", "eval"]
    assert loss.layout.yaxis.type == "log"
    assert charts.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no warm-up dip
    heat = charts.grad_heatmap(events)
    assert list(heat.data[0].y) == ["block 0", "block 1"]  # bottom first, "total" left out
    depth = charts.lr_depth_figure(events)
    assert list(depth.data[0].x) == ["embeddings", "block 0", "block 1"]
    single = [dict(e, lr={"all": 1e-3}, lr_by_depth={"prompt": 1e-3}) if e["type"] == "step" else e for e in events]
    assert "one rate" in charts.lr_groups_figure(single).layout.title.text
    assert "No training steps" in charts.loss_figure([]).layout.annotations[0].text
    assert len(charts.overlay_figure([("a", events), ("b", events)]).data) == 4


# ---- app.py exposure rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [(["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0"),
                                          (["--share"], "refusing --share"),
                                          (["--auth", "nopassword"], "user:password")])
def test_app_refuses_exposure_without_auth(argv, needle, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "app.py", "--data-dir", str(tmp_path), *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and needle in p.stderr


def _serve(argv, tmp_path, wait_for: str, timeout=90) -> tuple[subprocess.Popen, str]:
    """Start app.py with ``argv``; return the process and its stderr up to the line containing ``wait_for``."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "app.py", "--data-dir", str(tmp_path / "data"), *argv], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, end = "", time.time() + timeout
    while time.time() < end and wait_for not in seen:
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            break
        seen += line
    return p, seen


def test_public_bind_without_tls_warns_passwords_travel_in_clear(tmp_path):
    from app import clear_text_warning

    assert clear_text_warning("127.0.0.1", False) is None and clear_text_warning("0.0.0.0", True) is None
    assert "clear text" in clear_text_warning("0.0.0.0", False)
    p, out = _serve(["--host", "0.0.0.0", "--port", str(free_port()), "--auth", "ada:pw"], tmp_path, "Running on")
    try:
        assert "Running on" in out and "password and API tokens travel in clear text" in out, out
    finally:
        p.terminate()
        p.wait(30)


def test_ssl_flags_serve_https(tmp_path):
    from app import ssl_options

    with pytest.raises(ValueError, match="go together"):
        ssl_options("cert.pem", None)
    with pytest.raises(ValueError, match="no such file"):
        ssl_options(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    port = free_port()
    p, out = _serve(["--host", "0.0.0.0", "--port", str(port), "--auth", "ada:pw", "--ssl-certfile", str(cert),
                     "--ssl-keyfile", str(key)], tmp_path, "Running on")
    try:
        assert f"https://0.0.0.0:{port}" in out and "clear text" not in out, out
        r = httpx.get(f"https://127.0.0.1:{port}/api/v1/runs", auth=("ada", "pw"), verify=str(cert), timeout=30)
        assert r.status_code == 200 and r.json() == []
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/api/v1/runs", auth=("ada", "pw"), timeout=10)
    finally:
        p.terminate()
        p.wait(30)


def test_exposure_rules_unit():
    from app import check_exposure

    assert check_exposure("127.0.0.1", False, None) is None
    assert check_exposure("::1", False, None) is None
    assert check_exposure("0.0.0.0", False, ("u", "p")) is None
    assert "auth" in check_exposure("192.168.1.5", False, None)
    assert "--share" in check_exposure("127.0.0.1", True, None)


# ---- Data tab ----------------------------------------------------------------------------------------------


def test_sample_loads_with_format_report_preview_histogram(client, tiny_model_dir):
    status, issues, preview, hist, index = load_sample(client, tiny_model_dir)
    assert "instruction" in status and re.search(r"(\d+) of \1 rows valid, 0 skipped", status)
    assert issues["data"] == []
    assert "ps-trained" in preview and "ps-masked" in preview and "Quill" in preview
    assert hist["type"] == "plotly" and index == 1


BAD_UPLOADS = {
    "malformed.json": (b'[{"instruction": "a", "output": "b"}, {"instruction": ', "not valid JSON"),
    "wrong_fields.json": (json.dumps([{"foo": 1, "bar": 2}] * 5).encode(), "format"),
    "empty.jsonl": (b"", "empty"),
    "binary.json": (bytes(range(256)) * 8, "binary"),
    "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), "UTF-8"),
    "oversized.jsonl": (b'{"text": "' + b"x" * (UPLOAD_LIMIT + 10) + b'"}\n', "limit"),
    "not_a_list.json": (b'{"instruction": "a", "output": "b"}', "holds an object, not a list of objects"),
}


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_bad_uploads_leave_form_and_runs_untouched(client, app, tiny_model_dir, tmp_path, name):
    content, needle = BAD_UPLOADS[name]
    load_sample(client, tiny_model_dir)
    runs_before = [r.id for r in app[0].store.list()]
    uploads = sorted(app[0].uploads_dir.iterdir())
    path = tmp_path / name
    path.write_bytes(content)
    status, *_ = client.predict(handle_file(str(path)), tiny_model_dir, 128, api_name="/upload_dataset")
    assert status.startswith("✗") and needle.lower() in status.lower(), status
    assert "identity_sample.json" in status and "still selected" in status
    assert "Traceback" not in status
    assert [r.id for r in app[0].store.list()] == runs_before
    assert sorted(app[0].uploads_dir.iterdir()) == uploads  # a refused file is not kept
    # the session's dataset is still the sample: the config check sees its real token lengths
    assert "Trainable parameters" in call(client, "/check_config", TRAIN)


def test_wrong_extension_is_refused(client, app, tiny_model_dir, tmp_path):
    """gradio itself refuses a file type the component does not accept, before our handler runs."""
    path = tmp_path / "data.txt"
    path.write_text('[{"text": "hello"}]')
    uploads = sorted(app[0].uploads_dir.iterdir())
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(path)), tiny_model_dir, 128, api_name="/upload_dataset")
    accepted = list(EXTENSIONS)
    assert str(e.value) == f"Invalid file type. Please upload a file that is one of these formats: {accepted}"
    assert sorted(app[0].uploads_dir.iterdir()) == uploads  # nothing was stored


# ---- Train tab: validation before any work starts ---------------------------------------------------------


@pytest.mark.parametrize("overrides, needle", [
    ({"R (rank)": 0}, "r = 0"),
    ({"R (rank)": 100000}, "LoraConfig.r"),
    ({"Targets": ["no_such_proj"]}, "available: q_proj"),
    ({"Lr (per step)": 0}, "lr"),
    ({"Batch size (examples)": 0}, "batch_size"),
])
def test_bad_hyperparameters_are_rejected_naming_the_field(client, app, tiny_model_dir, overrides, needle):
    load_sample(client, tiny_model_dir)
    before = len(app[0].store.list())
    status, *_ = call(client, "/start_run", {**TRAIN, **overrides}, name="bad")
    assert status.startswith("✗") and needle in status, status
    assert len(app[0].store.list()) == before


def test_bad_method_knobs_other_methods(client, tiny_model_dir):
    load_sample(client, tiny_model_dir)
    out = call(client, "/check_config", {**TRAIN, "Method": "prompt_tuning", "Num virtual tokens (tokens)": 0})
    assert out.startswith("✗") and "num_virtual_tokens" in out
    out = call(client, "/check_config", {**TRAIN, "Method": "llrd", "Llrd decay (factor per block)": 1.5})
    assert out.startswith("✗") and "llrd_decay" in out
    out = call(client, "/check_config", {**TRAIN, "Method": "prefix_tuning", "Num virtual tokens (tokens)": 1000})
    assert out.startswith("✗") and "context" in out


def test_start_needs_a_dataset(app, tiny_model_dir):
    fresh = Client(app[1], verbose=False)  # a new session has no dataset
    status, *_ = call(fresh, "/start_run", TRAIN, name="nodata")
    assert "Data" in status and status.startswith("✗")


def applied(client) -> dict:
    """{label: value} of what /apply_advice set (the outputs it leaves alone come back as bare updates)."""
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/apply_advice"]
    out = client.predict(api_name="/apply_advice")
    got: dict = {}
    for r, value in zip(info["returns"], out):
        if not (isinstance(value, dict) and value.get("__type__") == "update"):
            got.setdefault(english(r.get("label")), value)
    return got


def test_advisor_recommends_and_applies(client, tiny_model_dir):
    from core.methods import spec

    text = client.predict(50, "cpu", "smallest", api_name="/advise")
    assert "Recommended: Prompt tuning" in text and "Seed table" in text
    form = applied(client)  # Apply: the form now holds the advised method, its knobs and its lr
    assert form["Method"] == "prompt_tuning"
    assert form["Num virtual tokens (tokens)"] == 20 and form["Init"] == "vocab"
    assert form["Lr (per step)"] == spec("prompt_tuning").lr
    blurb = [k for k in form if k not in ("Method", "Num virtual tokens (tokens)", "Init", "Lr (per step)")]
    assert len(blurb) == 1 and "soft tokens" in form[blurb[0]]  # and nothing else changed
    load_sample(client, tiny_model_dir)
    form.pop(blurb[0])
    out = call(client, "/check_config", {**TRAIN, **form})
    assert "**Trainable parameters:** 640 of" in out, out  # 20 virtual tokens × hidden size 32
    text = client.predict(50_000, "large_gpu", "quality", api_name="/advise")
    assert "Recommended: LLRD" in text
    form = applied(client)
    assert form["Method"] == "llrd" and form["Llrd decay (factor per block)"] == 0.9
    assert form["Lr (per step)"] == spec("full").lr


# ---- the whole flow: train -> monitor -> runs -> chat -> export ------------------------------------------


@pytest.fixture(scope="module")
def trained_run(app, tiny_model_dir):
    client = Client(app[1], verbose=False)
    load_sample(client, tiny_model_dir)
    _, run_id = start(client, app, "quill lora")
    st = wait_status(client, run_id)
    assert st["status"] == "completed", st
    return run_id


def test_run_completes_and_monitor_draws_charts(client, trained_run):
    st = client.predict(trained_run, api_name="/run_status")
    assert st["step"] == 6 and st["total_steps"] == 6 and st["eval_loss"] is not None and st["events"] == 6
    progress, stats, loss, heat, lr, depth, log = client.predict(trained_run, False, api_name="/monitor")
    assert "completed" in progress and "step <b>6</b> / 6" in progress
    assert "eval loss" in stats
    fig = json.loads(loss["plot"])
    assert [t["name"] for t in fig["data"]][:2] == ["train (raw)", "train (EMA 0.9)"]
    assert len(fig["data"][0]["x"]) == 6
    assert "heatmap" in heat["plot"] and "block 1" in heat["plot"]
    assert "end: completed" in log
    # LoRA has one rate for every group: the lr chart is one cosine curve, the depth chart flat at its last value
    lr_at = [TRAIN["Lr (per step)"] * lr_multiplier(s - 1, 6, 0, "cosine") for s in range(1, 7)]
    lr_fig, depth_fig = json.loads(lr["plot"]), json.loads(depth["plot"])
    assert len(lr_fig["data"]) == 1 and lr_fig["data"][0]["x"] == [1, 2, 3, 4, 5, 6]
    assert lr_fig["data"][0]["y"] == pytest.approx(lr_at, rel=1e-9)
    assert depth_fig["data"][0]["x"] == ["block 0", "block 1"]  # LoRA's q/v pairs in both blocks of the tiny model
    assert depth_fig["data"][0]["y"] == pytest.approx([lr_at[-1]] * 2, rel=1e-9)


def step_events(app, run_id) -> list[dict]:
    return [e for e in app[0].metrics.events(app[0].store.get(run_id).dir) if e["type"] == "step"]


def depth_chart(client, run_id) -> dict[str, float]:
    """The Monitor's 'current lr by depth' bars: {bar label: lr}."""
    _, _, _, _, _, depth, _ = client.predict(run_id, False, api_name="/monitor")
    bars = json.loads(depth["plot"])["data"][0]
    return dict(zip(bars["x"], bars["y"]))


def depth_name(d: str, layers: int) -> str:
    return {"-1": "embeddings", str(layers): "head"}.get(d, f"block {d}")


def test_llrd_run_from_the_studio_follows_the_decay_formula(client, app, tiny_model_dir):
    """LLRD from the Train tab: at every step, block l trains at lr·decay^(L−l−1); the embeddings sit one step
    below block 0 (decay^L) and the final norm/head at depth L get lr. Constant schedule: the formula exactly."""
    load_sample(client, tiny_model_dir)
    lr, decay, layers = 1e-3, 0.5, 2
    _, run_id = start(client, app, "llrd run", {"Method": "llrd", "Llrd decay (factor per block)": decay,
                                                 "Lr (per step)": lr, "Scheduler": "constant",
                                                 "Max steps (optimiser steps)": 4})
    assert wait_status(client, run_id)["status"] == "completed"
    steps = step_events(app, run_id)
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    want = {str(d): lr * decay ** (layers - d - 1) for d in range(layers)}
    want.update({"-1": lr * decay**layers, str(layers): lr})
    for e in steps:
        by_depth = e["lr_by_depth"]
        assert {"0", "1"} <= set(by_depth) <= set(want), by_depth
        assert by_depth == pytest.approx({d: want[d] for d in by_depth}, rel=1e-9), (e["step"], by_depth)
    assert depth_chart(client, run_id) == pytest.approx(
        {depth_name(d, layers): v for d, v in steps[-1]["lr_by_depth"].items()}, rel=1e-9)
    assert len(set(steps[-1]["lr_by_depth"].values())) >= 3  # the rates fan out


def test_layerwise_run_from_the_studio_follows_the_unfreezing_plan(client, app, tiny_model_dir):
    """Layer-wise unfreezing every k = 2 steps: steps 1-2 train the top block (and head), steps 3-4 also block 0,
    from step 5 on the embeddings too; a held-back depth is logged at lr 0, a training one at lr."""
    load_sample(client, tiny_model_dir)
    lr, k, layers = 1e-3, 2, 2
    _, run_id = start(client, app, "layerwise run", {"Method": "layerwise", "Unfreeze every (steps or epochs)": k,
                                                      "Unfreeze unit": "steps", "Lr (per step)": lr,
                                                      "Scheduler": "constant", "Max steps (optimiser steps)": 6})
    assert wait_status(client, run_id)["status"] == "completed"
    steps = step_events(app, run_id)
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    lowest = {1: 1, 2: 1, 3: 0, 4: 0, 5: -1, 6: -1}  # the plan: one more block downward every k steps
    for e in steps:
        by_depth = e["lr_by_depth"]
        assert {"-1", "0", "1"} <= set(by_depth), by_depth
        want = {d: (lr if d == "prompt" or int(d) >= lowest[e["step"]] else 0.0) for d in by_depth}
        assert by_depth == pytest.approx(want, rel=1e-9), (e["step"], by_depth)
    assert set(depth_chart(client, run_id).values()) == {lr}  # everything trains at the end
    # and the step at which each block started training, read back from the events
    first = {d: min(e["step"] for e in steps if e["lr_by_depth"][d] > 0) for d in ("-1", "0", "1")}
    assert first == {"1": 1, "0": 3, "-1": 5}


def test_resume_from_the_runs_tab(client, app, tiny_model_dir):
    """Stop a run part-way, resume it from the Runs tab: it continues from its checkpoint to the last step."""
    load_sample(client, tiny_model_dir)
    _, run_id = start(client, app, "to resume", {"Max steps (optimiser steps)": 60})
    end = time.time() + 120
    while (client.predict(run_id, api_name="/run_status")["step"] or 0) < 3 and time.time() < end:
        time.sleep(0.3)
    assert "Stopping" in client.predict(run_id, api_name="/stop_run")
    stopped = wait_status(client, run_id)
    assert stopped["status"] == "stopped" and 3 <= stopped["step"] < 60, stopped
    message, table, *_ = client.predict(run_id, [], api_name="/resume_run")
    assert message.startswith("Resuming **to resume** from its last checkpoint"), message
    done = wait_status(client, run_id)
    assert done["status"] == "completed" and done["step"] == 60, done
    events = app[0].metrics.events(app[0].store.get(run_id).dir)
    starts = [e for e in events if e["type"] == "start"]
    assert [s["step"] for s in starts] == [0, stopped["step"]] and starts[1]["resumed_from"] == stopped["step"]
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 61))  # no step lost or repeated
    row = next(r for r in table["data"] if r[-1] == run_id)
    assert row[4] in ("queued", "running")


def test_runs_table_and_overlay(client, trained_run):
    table, compare, target = client.predict([], None, api_name="/runs_table")
    row = next(r for r in table["data"] if r[-1] == trained_run)
    assert row[0] == "quill lora" and row[2] == "lora" and row[4] == "completed"
    from studio.tabs.runs import HEADERS

    assert row[HEADERS.index("runs.col.adapter_size")] != "—" and row[HEADERS.index("runs.col.task_score")] != "—"
    fig = client.predict([trained_run], False, api_name="/overlay")
    assert "quill lora" in fig["plot"]


def test_chat_side_by_side_base_and_adapter(client, trained_run, tiny_model_dir):
    assert any(r[1] == trained_run for r in client.predict(api_name="/chat_runs"))
    sent = client.predict("<b>Who are you?</b>", [trained_run], True, tiny_model_dir, api_name="/chat_send")
    msg, note, *bots = sent[:7]
    assert msg == "" and text_of(bots[0][0]) == "&lt;b&gt;Who are you?&lt;/b&gt;"  # shown as text, never HTML
    job = client.submit(0.0, 0.9, 12, "", "unmerged", api_name="/chat_reply")
    out = job.result(timeout=180)
    bots, latencies = out[:5], out[5:]
    assert bots[0][-1]["role"] == "assistant" and bots[1][-1]["role"] == "assistant"
    base, adapter = text_of(bots[0][-1]), text_of(bots[1][-1])
    assert adapter.strip() and base != adapter, (base, adapter)  # the adapter changes the greedy answer
    assert "first token" in latencies[0] and "unmerged" in latencies[1]
    # the same question with LoRA merged into the weights: the same greedy answer, its latency reported
    client.predict(api_name="/chat_clear")
    client.predict("<b>Who are you?</b>", [trained_run], True, tiny_model_dir, api_name="/chat_send")
    out = client.submit(0.0, 0.9, 12, "", "merged", api_name="/chat_reply").result(timeout=180)
    assert text_of(out[1][-1]) == adapter and text_of(out[0][-1]) == base
    assert "merged" in out[6] and "unmerged" not in out[6]
    # multi-turn: the second message keeps the history
    client.predict("And again?", [trained_run], True, tiny_model_dir, api_name="/chat_send")
    out = client.submit(0.0, 0.9, 8, "Be brief.", "merged", api_name="/chat_reply").result(timeout=180)
    assert len(out[1]) == 4 and "merged" in out[6]


def test_empty_and_huge_chat_prompts(client, trained_run, tiny_model_dir):
    client.predict(api_name="/chat_clear")
    msg, note, *_ = client.predict("   ", [], True, tiny_model_dir, api_name="/chat_send")
    assert "Type a message" in note
    msg, note, *bots = client.predict("x" * 100_000, [], True, tiny_model_dir, api_name="/chat_send")[:7]
    assert "100,000" in note and len(text_of(bots[0][-1])) == 20_000
    out = client.submit(0.0, 0.9, 4, "", "unmerged", api_name="/chat_reply").result(timeout=180)
    assert out[0][-1]["role"] == "assistant"


def test_export_adapter_zip_and_merged_model(client, app, trained_run, tiny_model_dir):
    files, message, snippet = client.predict(trained_run, api_name="/export_adapter")
    with zipfile.ZipFile(files[0]) as z:
        names = z.namelist()
    assert any(n.endswith("adapter_config.json") for n in names)
    assert any(n.endswith("adapter_model.safetensors") for n in names)
    assert "PeftModel.from_pretrained" in snippet
    files, message, snippet = client.predict(trained_run, api_name="/export_merged")
    assert files and files[0].endswith(".zip") and "AutoModelForCausalLM" in snippet
    folder = message.split("`")[1]
    import torch
    from transformers import AutoModelForCausalLM

    from core.checkpoint import load_adapter
    from core.forward import logits
    from core.models import load_model

    merged = AutoModelForCausalLM.from_pretrained(folder).eval()  # a plain HF folder: no PEFT code needed
    base, _ = load_model(tiny_model_dir, device="cpu")
    method = load_adapter(base, app[0].store.get(trained_run).adapter_dir)
    base.eval()
    ids = torch.tensor([[1, 17, 404, 9000, 23, 5, 48000, 2]])
    with torch.no_grad():
        want = logits(base, method, ids)
        got = merged(input_ids=ids).logits
        plain = logits(load_model(tiny_model_dir, device="cpu")[0], None, ids)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-5, rtol=1e-4)  # the adapter does change the logits
    # both exports carry the model card
    assert "base_model:" in (Path(folder) / "README.md").read_text()
    with zipfile.ZipFile(client.predict(trained_run, api_name="/export_adapter")[0][0]) as z:
        assert any(n.endswith("/README.md") for n in z.namelist())
    # GGUF from the Export tab: loads back through transformers' GGUF reader with the merged folder's logits
    files, message, snippet = client.predict(trained_run, "f16", api_name="/export_gguf")
    gguf_path = Path(files[0])
    assert gguf_path.suffix == ".gguf" and "GGUF (f16)" in message and "gguf_file=" in snippet
    served = Path(app[0].exports_dir, trained_run, gguf_path.name)
    from_gguf = AutoModelForCausalLM.from_pretrained(served.parent, gguf_file=served.name).eval()
    with torch.no_grad():
        assert torch.allclose(from_gguf(input_ids=ids).logits, got, atol=1e-2, rtol=1e-2)


def test_rename_and_delete_with_confirmation(client, app, trained_run, tiny_model_dir):
    load_sample(client, tiny_model_dir)
    _, run_id = start(client, app, "to delete", {"Max steps (optimiser steps)": 2})
    wait_status(client, run_id)
    with pytest.raises(Exception, match="not allowed"):
        client.predict(run_id, "../escape", [], api_name="/rename_run")
    message, *_ = client.predict(run_id, "renamed run", [], api_name="/rename_run")
    assert "renamed run" in message and app[0].store.get(run_id).name == "renamed run"
    folder = app[0].store.get(run_id).dir
    confirm_row, message = client.predict(run_id, api_name="/delete_run")
    assert app[0].store.get(run_id) is not None  # nothing deleted before the confirmation
    message, *_ = client.predict(run_id, [], api_name="/confirm_delete")
    assert "Deleted" in message and app[0].store.get(run_id) is None and not folder.exists()
    assert app[0].store.get(trained_run) is not None


def test_queue_positions_stop_and_killed_worker(client, app, tiny_model_dir):
    import os
    import signal

    load_sample(client, tiny_model_dir)
    slow = {"Max steps (optimiser steps)": 5000}
    _, a = start(client, app, "long A", slow)
    status, b = start(client, app, "long B", slow)
    assert "position 1" in status
    wait_status(client, a, done=("running",))
    st = client.predict(b, api_name="/run_status")
    assert st["status"] == "queued" and st["position"] == 1
    # the first worker dies hard: the run is marked with the reason, the queue moves on, the server lives
    end = time.time() + 120
    while not client.predict(a, api_name="/run_status")["step"] and time.time() < end:
        time.sleep(0.5)
    os.kill(app[0].store.get(a).pid, signal.SIGKILL)
    st = wait_status(client, a)
    assert st["status"] == "interrupted" and "SIGKILL" in st["reason"]
    progress, *_ = client.predict(a, False, api_name="/monitor")
    assert "interrupted" in progress and "SIGKILL" in progress
    wait_status(client, b, done=("running",))
    assert "Stopping" in client.predict(b, api_name="/stop_run")
    assert wait_status(client, b)["status"] == "stopped"


# ---- auth --------------------------------------------------------------------------------------------------


def test_auth_required_on_every_route(tmp_path, tiny_model_dir):
    ctx, demo, url = start_app(tmp_path / "data", tiny_model_dir, auth=("ada", "s3cret-pass"))
    secret = ctx.exports_dir / "secret.zip"
    secret.write_bytes(b"top secret bytes")
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False)  # the API used by gradio_client
        for route in ("config", "gradio_api/info", "gradio_api/queue/status", f"gradio_api/file={secret}"):
            r = httpx.get(url + route, timeout=10)
            assert r.status_code == 401 and "top secret" not in r.text, (route, r.status_code)
        for route in ("gradio_api/upload", "gradio_api/queue/join", "gradio_api/run/run_status",
                      "gradio_api/call/run_status"):
            r = httpx.post(url + route, json={"data": ["x"], "fn_index": 0, "session_hash": "x"}, timeout=10)
            assert r.status_code == 401, (route, r.status_code)
        page = httpx.get(url, timeout=10).text  # only the login page shell: no layout, no data
        assert "identity_sample" not in page and "ps-upload" not in page
        authed = Client(url, auth=("ada", "s3cret-pass"), verbose=False)
        assert authed.predict(api_name="/chat_runs") == []
        with pytest.raises(Exception):
            Client(url, auth=("ada", "wrong"), verbose=False)
    finally:
        demo.close()
        ctx.close()


def test_what_the_browser_remembers_opens_after_a_restart(tmp_path, tiny_model_dir):
    """The page keeps the loaded dataset in the browser (gr.BrowserState), encrypted; the key is kept in the data
    folder, so a restarted studio on the same folder reads it again, and another folder's studio cannot."""
    import gradio as gr

    def secret(data_dir) -> str:
        ctx = StudioContext.create(data_dir, default_model=tiny_model_dir, start_jobs=False)
        try:
            states = [b for b in build_app(ctx).blocks.values() if isinstance(b, gr.BrowserState)]
        finally:
            ctx.close()
        assert states
        return states[0].secret

    first = secret(tmp_path / "data")
    assert secret(tmp_path / "data") == first  # the same folder after a restart
    assert secret(tmp_path / "other") != first
    assert (tmp_path / "data" / "browser_secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("value, default, fits", [
    (0.0123, 2e-4, True), (7, 100, True), (True, 2e-4, False), ("0.01", 2e-4, False), (float("nan"), 1.0, False),
    (False, True, True), (1, True, False), ("q_proj, v_proj", ["q_proj"], True), (["q_proj"], ["all-linear"], True),
    ([1, 2], ["q_proj"], False), ("instruction=q", {}, True), ("auto", "fp32", True), (3, None, True),
])
def test_the_train_form_puts_back_only_values_that_fit_their_field(value, default, fits):
    """The Train form kept across the language switch by another version of the studio: a value of the wrong kind
    is dropped (the field keeps its default) instead of failing the page's load."""
    from studio.tabs.train import same_kind

    assert same_kind(value, default) is fits
