"""The versioned JSON API, mounted at /api/v1 on the same server as the Gradio page (studio.ui.launch_options).

    POST /api/v1/runs                      a RunConfig (config.yaml's shape) -> 201 {"id", "name", "position", ...}
    GET  /api/v1/runs                      every run's status
    GET  /api/v1/runs/{id}                 status, facts and a summary of the metrics
    GET  /api/v1/runs/{id}/metrics         the metric events (?type=step&since=10)
    POST /api/v1/runs/{id}/stop            ask it to stop
    GET  /api/v1/runs/{id}/adapter.zip     the adapter of a finished run
    POST /api/v1/chat                      {"message", "run"?} -> server-sent events: "delta" {"text"} ..., "done"
    GET  /api/v1/docs, /api/v1/openapi.json

Every route goes through studio.actions, as the tabs do. With --auth every route (the docs too) needs one of:
the page's login cookie, HTTP Basic with the --auth user and password, or an API token (``Authorization:
Bearer pst_...``, studio.tokens). A wrong Basic password or token counts as a failed sign-in in the same
per-address LoginThrottle as the page's /login (growing delays, then 429). Without --auth (loopback only, see
app.py) the API is open, like the page.

Errors are JSON {"detail": one sentence} (422 also has "field", e.g. "train.lr"): 400 for a body that is not
JSON, 401 without valid credentials, 404 for an unknown run, 409 when the run is not in a state for it, 429 when
locked out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import secrets
import threading
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from core.config import FieldError, RunConfig
from core.generate import GenerationSettings

from . import actions, tokens
from .paths import UnsafePathError
from .security import LoginThrottle

log = logging.getLogger("peft_studio.api")

PREFIX = "/api/v1"
PARENT = "peft_studio.parent_app"  # scope key: the gradio App the API is mounted in (its login cookies)
REALM = 'Basic realm="PEFT Studio", charset="UTF-8"'


class ApiError(HTTPException):
    def __init__(self, status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers)
        self.field = field


# ---- auth --------------------------------------------------------------------------------------------------


class Authorizer:
    """Who is calling: "user:<name>" (cookie or Basic), "token:<id>" (Bearer) or "open" (no --auth)."""

    def __init__(self, store, auth: tuple[str, str] | None, throttle: LoginThrottle):
        self.store, self.auth, self.throttle = store, auth, throttle

    def _cookie_user(self, request: Request) -> str | None:
        parent = request.scope.get(PARENT)  # gradio 6 keeps its sessions in App.tokens, keyed by this cookie
        if parent is None:
            return None
        cid = parent.cookie_id
        token = request.cookies.get(f"access-token-{cid}") or request.cookies.get(f"access-token-unsecure-{cid}")
        return parent.tokens.get(token) if token else None

    def _check(self, scheme: str, value: str) -> str | None:
        if scheme == "bearer":
            token_id = tokens.verify(self.store, value)
            return f"token:{token_id}" if token_id else None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        want_user, want_password = self.auth  # type: ignore[misc]
        ok_user = secrets.compare_digest(user.encode(), want_user.encode())
        ok_password = secrets.compare_digest(password.encode(), want_password.encode())
        return f"user:{user}" if ok_user and ok_password else None

    async def __call__(self, request: Request) -> str:
        if self.auth is None:
            return "open"
        user = self._cookie_user(request)
        if user is not None:
            return f"user:{user}"
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme not in ("basic", "bearer") or not value:
            raise ApiError(401, "Sign in: send HTTP Basic with the --auth user and password, an API token as "
                                "'Authorization: Bearer ...', or the page's login cookie.",
                           headers={"WWW-Authenticate": REALM})
        addr = request.client.host if request.client else "?"
        locked = self.throttle.locked_for(addr)
        if locked > 0:
            log.warning("API sign-in refused: %s is locked out for %.0f s more", addr, locked)
            raise ApiError(429, f"Too many failed sign-ins from this address; try again in {math.ceil(locked)} s.",
                           headers={"Retry-After": str(math.ceil(locked))})
        wait = self.throttle.delay(addr)
        if wait > 0:
            await asyncio.sleep(wait)
        who = await anyio.to_thread.run_sync(self._check, scheme, value)
        if who is None:
            n = self.throttle.failed(addr)
            log.warning("API sign-in (%s) from %s failed (%d in a row%s)", scheme, addr, n,
                        "; now locked out" if n >= self.throttle.lock_after else "")
            raise ApiError(401, "Wrong user name, password or API token.", headers={"WWW-Authenticate": REALM})
        self.throttle.succeeded(addr)
        return who


class WithParent:
    """ASGI wrapper of the mounted API: remembers the gradio App it is mounted in (its login cookies) in the
    request scope, which the sub-application would otherwise replace with itself."""

    def __init__(self, api: FastAPI):
        self.api = api

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, PARENT: scope.get("app")}
        await self.api(scope, receive, send)


# ---- bodies ------------------------------------------------------------------------------------------------


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}).") from None


def _example_run() -> dict[str, Any]:
    """The body POST /runs documents: core's defaults on the bundled identity sample, 8 steps."""
    d = RunConfig().to_dict()
    d.update(name="quill-lora", model="default")
    d["train"] = {"max_steps": 8, "lr": 2e-3}
    d["data"] = {"path": "identity_sample.json"}
    d["method_config"] = {"r": 8, "alpha": 16}
    return d


def _object_body(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/json": {"schema": {"type": "object"}, "example": example}}}}


CHAT_FIELDS = ("message", "run", "base", "model", "system", "max_new_tokens", "temperature", "top_p")


def chat_request(body: Any) -> dict[str, Any]:
    """The chat body's values, checked: ApiError 422 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(422, "The chat request must be a JSON object with at least \"message\".")
    unknown = sorted(set(body) - set(CHAT_FIELDS))
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field; known: {', '.join(CHAT_FIELDS)}", unknown[0])
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise ApiError(422, "message: send the text to answer, a non-empty string.", "message")
    run = body.get("run")
    if run is not None and not isinstance(run, str):
        raise ApiError(422, "run: a run id (a string), or leave it out for the base model.", "run")
    values = {k: body[k] for k in ("max_new_tokens", "temperature", "top_p", "system") if k in body}
    try:
        settings = GenerationSettings.from_dict({"temperature": 0.0, **values})  # greedy unless asked
    except FieldError as e:
        raise ApiError(422, f"{e.field}: {e}", e.field) from None
    return {"message": message, "run": run, "base": bool(body.get("base", run is None)),
            "model": body.get("model"), "settings": settings}


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- the app -----------------------------------------------------------------------------------------------


def build_api(ctx, auth: tuple[str, str] | None, throttle: LoginThrottle) -> FastAPI:
    """The API application; studio.ui mounts ``WithParent(build_api(...))`` at PREFIX."""
    authorize = Authorizer(ctx.store, auth, throttle)
    api = FastAPI(title="PEFT Studio API", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authorize)],
                  description="Start runs, follow them, download adapters and chat, on the studio's own server.")

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        body: dict[str, Any] = {"detail": exc.detail}
        if getattr(exc, "field", None):
            body["field"] = exc.field
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    def run_or_404(run_id: str):
        try:
            run = ctx.store.get(run_id)
        except UnsafePathError:
            run = None
        if run is None:
            raise ApiError(404, f"No run has the id {run_id[:40]!r}; GET {PREFIX}/runs lists them.")
        return run

    @api.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return api.openapi()

    @api.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="PEFT Studio API")

    @api.post("/runs", status_code=201, summary="Queue a run from a RunConfig",
              openapi_extra=_object_body("A RunConfig as in a run's config.yaml; data.path names a bundled sample "
                                         "or an uploaded dataset; left-out values take core's defaults.",
                                         _example_run()))
    async def create_run(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        try:
            return await anyio.to_thread.run_sync(actions.submit_config, ctx, body)
        except FieldError as e:
            msg = str(e)
            raise ApiError(422, msg if not e.field or msg.startswith(e.field) else f"{e.field}: {msg}",
                           e.field or None) from None
        except ValueError as e:  # the engine's preflight (targets, context length, the model itself)
            raise ApiError(422, str(e)) from None

    @api.get("/runs", summary="Every run, newest first")
    def list_runs() -> list[dict[str, Any]]:
        return actions.list_runs(ctx)

    @api.get("/runs/{run_id}", summary="A run's status, facts and metric summary")
    def get_run(run_id: str) -> dict[str, Any]:
        return actions.run_detail(ctx, run_or_404(run_id).id)

    @api.get("/runs/{run_id}/metrics", summary="A run's metric events (core.events schema)")
    def get_metrics(run_id: str, type: str | None = None, since: int = 0) -> list[dict[str, Any]]:  # noqa: A002
        return actions.run_events(ctx, run_or_404(run_id).id, type, since)

    @api.post("/runs/{run_id}/stop", summary="Ask a run to stop (a queued run leaves the queue)")
    def stop(run_id: str) -> dict[str, Any]:
        run = run_or_404(run_id)
        if not run.active:
            raise ApiError(409, f"'{run.name}' is not running ({run.status}).")
        return {"id": run.id, "message": actions.stop_run(ctx, run.id)}

    @api.get("/runs/{run_id}/adapter.zip", summary="The adapter of a finished run, zipped",
              response_class=FileResponse)
    def adapter(run_id: str) -> FileResponse:
        run = run_or_404(run_id)
        try:
            z = actions.export_adapter(ctx, run.id)
        except ValueError as e:
            raise ApiError(409, str(e)) from None
        return FileResponse(z["path"], media_type="application/zip", filename=z["path"].rsplit("/", 1)[-1])

    @api.post("/chat", summary="Chat with the base model or a run, streamed as server-sent events",
              response_class=StreamingResponse,
              openapi_extra=_object_body(
                  "message (required); run: a run id (default: the base model); base: also answer with the base "
                  "model; max_new_tokens, temperature (0 = greedy), top_p, system. The stream is 'delta' events "
                  "{column, text} and one 'done' event {columns: {key: {text, stats}}}.",
                  {"message": "Who are you?", "max_new_tokens": 32}))
    async def chat(request: Request) -> StreamingResponse:
        req = chat_request(await json_body(request))
        if req["run"] is not None:
            run = run_or_404(req["run"])
            if not run.has_adapter:
                raise ApiError(409, f"'{run.name}' has no saved adapter yet ({run.status}).")
        try:
            started = actions.chat_start(ctx, req["message"], [req["run"]] if req["run"] else [], req["base"],
                                         req["model"])
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        s = req["settings"]
        pieces = actions.chat_reply(ctx, started["job"], started["histories"], s.temperature, s.top_p,
                                    s.max_new_tokens, s.system)
        return StreamingResponse(_stream(pieces, started["note"]), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return api


async def _stream(pieces, note: str):
    """SSE of chat_reply's pieces (each holds a column's whole text so far): the new text as 'delta' events,
    then 'done' with every column's answer and stats. The generator is closed however the client leaves, so the
    chat model's lock is always released."""
    lock = threading.Lock()  # next() and close() of one generator never overlap

    def step():
        with lock:
            return next(pieces, None)

    def close():
        with lock:
            pieces.close()

    sent: dict[str, int] = {}
    done: dict[str, dict[str, str]] = {}
    try:
        if note:
            yield _sse("note", {"text": note})
        while (piece := await anyio.to_thread.run_sync(step)) is not None:
            key, text = piece["key"], piece["text"]
            if len(text) > sent.get(key, 0):
                yield _sse("delta", {"column": key, "text": text[sent.get(key, 0):]})
                sent[key] = len(text)
            if piece["done"]:
                done[key] = {"text": text, "stats": piece["stats"]}
        yield _sse("done", {"columns": done})
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close)


__all__ = ["PREFIX", "Authorizer", "WithParent", "build_api", "chat_request"]
