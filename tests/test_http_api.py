"""The JSON API at /api/v1 (studio.api), driven with httpx against a running studio with --auth, on the tiny model
with the real worker: the full cycle (create -> poll -> metrics -> chat stream -> adapter.zip), the three ways to
sign in (page cookie, Basic, Bearer token), refusals (no credentials, a revoked token, bad JSON, a bad field),
the shared throttle, and a walk over every route the app registers, none of which may answer with data unsigned.
"""

import io
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from starlette.routing import Mount, Route, WebSocketRoute

from studio import tokens
from studio.api import PREFIX
from studio.security import LoginThrottle
from test_studio_api import start_app

from conftest import tiny_model_dir  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
USER = ("ada", "s3cret-pass")
RUN = {"name": "api quill", "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "max_len": 128},
       "data": {"path": "identity_sample.json"}}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    ctx, demo, url = start_app(tmp_path_factory.mktemp("api-data"), tiny_model_dir, auth=USER)
    yield ctx, demo, url.rstrip("/")
    demo.close()
    for run in ctx.store.list(status=("running", "queued")):
        ctx.jobs.stop(run.id)
    ctx.close()


@pytest.fixture(scope="module")
def api(app):
    with httpx.Client(base_url=app[2] + PREFIX, auth=USER, timeout=120) as c:
        yield c


def wait_done(api, run_id, timeout=300) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        r = api.get(f"/runs/{run_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("completed", "stopped", "failed", "interrupted"):
            return r.json()
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish")


@pytest.fixture(scope="module")
def trained(api):
    r = api.post("/runs", json=RUN)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    assert r.json()["name"] == "api quill" and r.json()["estimate"]["trainable"] > 0
    done = wait_done(api, run_id)
    assert done["status"] == "completed", done
    return run_id


def sse(response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body."""
    out, event = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
    return out


# ---- the full cycle ----------------------------------------------------------------------------------------


def test_full_cycle(api, app, trained, tiny_model_dir, tmp_path):
    listed = api.get("/runs").json()
    assert any(r["id"] == trained and r["status"] == "completed" for r in listed)
    detail = api.get(f"/runs/{trained}").json()
    assert detail["step"] == 6 and detail["total_steps"] == 6 and detail["method"] == "lora"
    assert detail["summary"]["steps"] == 6 and detail["summary"]["end_status"] == "completed"
    assert detail["config"]["train"]["lr"] == 1e-2 and detail["has_adapter"]
    events = api.get(f"/runs/{trained}/metrics").json()
    assert [e["type"] for e in events][0] == "start" and events[-1]["type"] == "end"
    steps = api.get(f"/runs/{trained}/metrics", params={"type": "step", "since": 4}).json()
    assert [e["step"] for e in steps] == [5, 6] and all(math_ok(e["loss"]) for e in steps)

    # chat: a stream of text deltas, then a done event whose text is the deltas joined
    with api.stream("POST", "/chat", json={"message": "Who are you?", "run": trained, "max_new_tokens": 8}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = sse(r)
    kinds = [k for k, _ in got]
    assert kinds[-1] == "done" and kinds.count("delta") >= 2 and set(kinds) == {"delta", "done"}
    text = "".join(d["text"] for k, d in got if k == "delta")
    answer = got[-1][1]["columns"][trained]
    assert text == answer["text"] and text.strip() and "tok/s" in answer["stats"]
    # the same greedy answer as the studio's own chat action (one path), and the base model differs
    from studio import actions

    assert actions.chat(app[0], "Who are you?", [trained], False, max_new_tokens=8, temperature=0.0)[trained]["text"] == text
    with api.stream("POST", "/chat", json={"message": "Who are you?", "max_new_tokens": 8}) as r:
        base = sse(r)[-1][1]["columns"]["base"]["text"]
    assert base != text

    # the adapter zip loads with the engine and changes the tiny model's logits
    z = api.get(f"/runs/{trained}/adapter.zip")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path)
    assert any(n.endswith("adapter_model.safetensors") for n in names)
    assert any(n.endswith("README.md") for n in names)  # the model card travels with every export
    folder = next(p.parent for p in tmp_path.rglob("adapter_config.json"))
    assert "base_model:" in (folder / "README.md").read_text()
    import torch

    from core.checkpoint import load_adapter
    from core.forward import logits
    from core.models import load_model

    model, _ = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([[1, 17, 404, 9000, 23]])
    with torch.no_grad():
        plain = logits(model, None, ids)
        method = load_adapter(model, folder)
        adapted = logits(model, method, ids)
    assert not torch.allclose(plain, adapted, atol=1e-5)


def math_ok(x) -> bool:
    return isinstance(x, float) and x == x


def test_stop_and_unknown_runs(api):
    r = api.post("/runs", json={**RUN, "name": "long one", "train": {**RUN["train"], "max_steps": 5000}})
    run_id = r.json()["id"]
    end = time.time() + 120
    while api.get(f"/runs/{run_id}").json()["status"] != "running" and time.time() < end:
        time.sleep(0.3)
    stop = api.post(f"/runs/{run_id}/stop")
    assert stop.status_code == 200 and "Stopping" in stop.json()["message"]
    assert wait_done(api, run_id)["status"] == "stopped"
    again = api.post(f"/runs/{run_id}/stop")
    assert again.status_code == 409 and "not running" in again.json()["detail"]
    for path in ("/runs/20990101-000000-abcdef", "/runs/..%2F..%2Fetc", "/runs/nope/metrics",
                 "/runs/20990101-000000-abcdef/adapter.zip"):
        r = api.get(path)
        assert r.status_code == 404, (path, r.text)  # a path that is no route at all is gradio's plain 404
        assert "%2F" in path or "No run has the id" in r.json()["detail"], (path, r.text)
    r = api.post("/chat", json={"message": "hi", "run": "20990101-000000-abcdef"})
    assert r.status_code == 404


# ---- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
])
def test_bad_json_is_rejected(api, app, body, status, needle):
    before = len(app[0].store.list())
    r = api.post("/runs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and needle in r.json()["detail"], r.text
    assert len(app[0].store.list()) == before
    r = api.post("/chat", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "detail" in r.json()


@pytest.mark.parametrize("change, field", [
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"batch_size": "four"}}, "train.batch_size"),
    ({"train": {"nope": 1}}, "train.nope"),
    ({"method": "lora", "method_config": {"r": 0}}, "method_config.r"),
    ({"method": "no_such_method"}, "method"),
    ({"data": {"path": "/etc/passwd"}}, "data.path"),
    ({"data": {"path": "identity_sample.json", "val_fraction": 0.9}}, "data.val_fraction"),
    ({"colour": "red"}, "colour"),
])
def test_bad_field_gets_422_naming_it(api, app, change, field):
    before = len(app[0].store.list())
    r = api.post("/runs", json={**RUN, **change})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["detail"].startswith(field), r.json()
    assert len(app[0].store.list()) == before


def test_bad_chat_fields(api):
    for body, field in (({"message": ""}, "message"), ({"message": "hi", "temperature": 9}, "temperature"),
                        ({"message": "hi", "max_new_tokens": 0}, "max_new_tokens"), ({"text": "hi"}, "text")):
        r = api.post("/chat", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_no_credentials_is_refused(app):
    url = app[2] + PREFIX
    for method, path in (("GET", "/runs"), ("POST", "/runs"), ("POST", "/chat"), ("GET", "/docs"),
                         ("GET", "/openapi.json")):
        r = httpx.request(method, url + path, json=RUN, timeout=30)
        assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"], (path, r.status_code)
    r = httpx.get(url + "/runs", auth=("ada", "wrong"), timeout=30)
    assert r.status_code == 401 and "Wrong" in r.json()["detail"]


def test_docs_with_auth(api):
    assert "swagger-ui" in api.get("/docs").text
    paths = api.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/runs", "/runs/{run_id}", "/runs/{run_id}/metrics", "/runs/{run_id}/stop",
                          "/runs/{run_id}/adapter.zip", "/chat"}


def test_page_login_cookie_signs_in_to_the_api(app):
    with httpx.Client(base_url=app[2], timeout=30) as c:
        assert c.get(PREFIX + "/runs").status_code == 401
        assert c.post("/login", data={"username": USER[0], "password": USER[1]}).status_code == 200
        assert c.get(PREFIX + "/runs").status_code == 200


def test_tokens_sign_in_and_revoked_token_is_refused(app):
    store, url = app[0].store, app[2] + PREFIX
    t = tokens.create(store, "ci")
    assert t["token"] not in store.db_path.read_bytes().decode("latin-1")  # only its hash is stored
    bearer = {"Authorization": f"Bearer {t['token']}"}
    assert httpx.get(url + "/runs", headers=bearer, timeout=30).status_code == 200
    assert next(r for r in tokens.listing(store) if r["id"] == t["id"])["last_used"] is not None
    tampered = {"Authorization": f"Bearer {t['token'][:-1]}{'A' if t['token'][-1] != 'A' else 'B'}"}
    assert httpx.get(url + "/runs", headers=tampered, timeout=30).status_code == 401
    assert tokens.revoke(store, t["id"]) == "ci"
    r = httpx.get(url + "/runs", headers=bearer, timeout=30)
    assert r.status_code == 401 and "token" in r.json()["detail"]
    with pytest.raises(ValueError, match="already revoked"):
        tokens.revoke(store, t["id"])


def test_token_panel_in_the_studio(app):
    client = Client(app[2] + "/", auth=USER, verbose=False)
    token, table, message = client.predict("from the page", api_name="/create_token")
    assert token.startswith(tokens.PREFIX) and "Created token" in message
    token_id = token.split("_")[1]
    assert [token_id, "from the page"] == [row[:2] for row in table["data"] if row[0] == token_id][0]
    assert httpx.get(app[2] + PREFIX + "/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    shown, table, message = client.predict(token_id, api_name="/revoke_token")
    assert shown == "" and "Revoked" in message
    assert [row[4] for row in table["data"] if row[0] == token_id] == ["revoked"]
    assert httpx.get(app[2] + PREFIX + "/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    with pytest.raises(Exception, match="No API token has the id"):
        client.predict("ffffffff", api_name="/revoke_token")


def test_token_cli(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "studio", "--data-dir", str(tmp_path), "token", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    made = cli("create", "nightly")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    token_id = token.split("_")[1]
    listed = cli("list")
    assert token_id in listed.stdout and "nightly" in listed.stdout and "valid" in listed.stdout
    assert token not in listed.stdout
    from studio.store import RunStore

    assert tokens.verify(RunStore(tmp_path), token) == token_id
    assert cli("revoke", token_id).returncode == 0
    assert "revoked" in cli("list").stdout and tokens.verify(RunStore(tmp_path), token) is None
    bad = cli("revoke", "nonsense")
    assert bad.returncode == 2 and "No API token" in bad.stderr and "Traceback" not in bad.stderr


# ---- the throttle is shared by the page's /login and the API -----------------------------------------------


def test_api_auth_failures_share_the_login_throttle(tmp_path, tiny_model_dir):
    now = [1000.0]
    throttle = LoginThrottle(free=2, base=0.2, cap=0.2, lock_after=4, lock_s=60, clock=lambda: now[0])
    ctx, demo, url = start_app(tmp_path / "data", tiny_model_dir, auth=USER, throttle=throttle)
    api = url.rstrip("/") + PREFIX
    try:
        assert httpx.get(api + "/runs", auth=("ada", "nope"), timeout=30).status_code == 401
        assert httpx.get(api + "/runs", headers={"Authorization": "Bearer pst_bad"}, timeout=30).status_code == 401
        started = time.perf_counter()
        assert httpx.get(api + "/runs", auth=("ada", "nope"), timeout=30).status_code == 401
        assert time.perf_counter() - started >= 0.2  # past the free failures, each attempt waits
        assert httpx.post(url + "login", data={"username": "ada", "password": "nope"}, timeout=30).status_code == 400
        # 4 failures (3 on the API, 1 on the page): locked out, on both, even with the right password
        r = httpx.get(api + "/runs", auth=USER, timeout=30)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert httpx.post(url + "login", data={"username": "ada", "password": USER[1]}, timeout=30).status_code == 429
        now[0] += 61  # the lockout ends
        assert httpx.get(api + "/runs", auth=USER, timeout=30).status_code == 200
        assert throttle.delay("127.0.0.1") == 0  # a success clears the record
    finally:
        demo.close()
        ctx.close()


def test_without_auth_the_api_is_open_like_the_page(tmp_path, tiny_model_dir):
    ctx, demo, url = start_app(tmp_path / "data", tiny_model_dir)
    try:
        assert httpx.get(url + "api/v1/runs", timeout=30).json() == []
    finally:
        demo.close()
        ctx.close()


# ---- no route answers with data unsigned ---------------------------------------------------------------------

# Routes that answer without signing in, each on purpose. Everything else must refuse (401/403/404/405/3xx) and
# no answer may contain the secret markers below.
PUBLIC = {
    "/": "the login page shell (its API description is blanked by HideApiInfoWhenLoggedOut)",
    "/login": "the login form's target (POST; it redirects a GET)",
    "/login/": "the same",
    "/logout": "signing out needs no sign-in",
    "/favicon.ico": "the logo",
    "/manifest.json": "the PWA manifest: app name and icons",
    "/gradio_api/app_id": "a random id of this server process, needed by the login page",
    "/gradio_api/app_id/": "the same",
    "/gradio_api/startup-events": "whether gradio's startup events have run (true/false)",
    "/pwa_icon": "the logo",
    "/pwa_icon/{size}": "the logo, resized",
    "/robots.txt": "crawler rules",
    "/gradio_api/token": "echoes the caller's own cookie (none when signed out)",
    "/gradio_api/token/": "the same",
    "/gradio_api/user": "the caller's own user name (none when signed out)",
    "/gradio_api/user/": "the same",
    "/gradio_api/login_check": "answers 401 when signed out",
    "/gradio_api/login_check/": "the same",
}
PUBLIC_PREFIXES = {
    "/static/": "gradio's own JS/CSS bundle",
    "/assets/": "gradio's own JS/CSS bundle",
    "/svelte/": "gradio's own JS bundle",
    "/gradio_api/theme.css": "the theme's CSS",
    "/theme.css": "the theme's CSS",
    "/custom_component/": "custom component bundles (none in this app)",
    "/gradio_api/upload_progress": "progress of the caller's own upload id (no data)",
}


def all_routes(routes, prefix=""):
    for route in routes:
        if isinstance(route, Mount):
            inner = getattr(route.app, "api", route.app)  # studio.api.WithParent wraps the mounted API
            yield from all_routes(getattr(inner, "routes", []), prefix + route.path)
        elif hasattr(route, "original_router"):  # FastAPI's included router (gradio's /gradio_api/...)
            yield from all_routes(route.original_router.routes, prefix + route.include_context.prefix)
        elif isinstance(route, (Route, WebSocketRoute)) or hasattr(route, "methods"):
            yield prefix + route.path, sorted(getattr(route, "methods", None) or {"WEBSOCKET"})


def fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m.group(1), values["*"]), path)


def test_no_route_returns_data_without_auth(app, trained, api):
    ctx, demo, url = app
    secret = ctx.exports_dir / "secret.txt"
    secret.write_text("top secret bytes")
    api.get(f"/runs/{trained}/adapter.zip")  # an export exists on disk
    run = ctx.store.get(trained)
    markers = ["top secret", trained, run.name, "identity_sample", "Quill"]
    values = {"run_id": trained, "*": str(secret)}
    routes = sorted(set((p, tuple(m)) for p, m in all_routes(demo.server_app.routes)))
    assert any(p.startswith(PREFIX) for p, _ in routes) and len(routes) > 80
    seen_public, checked, open_routes = set(), 0, []
    with httpx.Client(timeout=30, follow_redirects=False) as c:
        for path, methods in routes:
            for method in methods:
                if method in ("HEAD", "OPTIONS", "WEBSOCKET"):
                    continue
                target = fill(path, values)
                r = c.request(method, url + target, json={"data": ["x"], "fn_index": 0, "session_hash": "x"})
                checked += 1
                body = r.text
                leaked = [m for m in markers if m in body]
                assert not leaked, (method, path, r.status_code, leaked)
                public = path in PUBLIC or any(path.startswith(p) for p in PUBLIC_PREFIXES)
                if 200 <= r.status_code < 300 and not public:
                    open_routes.append(f"{method} {path} -> {r.status_code}: {body[:100]}")
                if public:
                    seen_public.add(path)
    assert not open_routes, "\n".join(open_routes)
    assert checked > 60
    # the allow-list holds no route this app lacks (a stale entry would hide nothing, but would mislead)
    assert set(PUBLIC) - {p for p, _ in routes} == set(), set(PUBLIC) - {p for p, _ in routes}
