"""HTTP hardening on top of gradio's own auth.

With auth on, gradio answers every data route (config, API, queue, uploads, file downloads) with 401 until the
user logs in, but the login page itself embeds ``window.gradio_api_info``: the full API description, including
component defaults such as run names and the model path. ``HideApiInfoWhenLoggedOut`` blanks that object on
pages rendered for a logged-out visitor (their config says ``"auth_required": true``).
"""

from __future__ import annotations

import re

_API_INFO = re.compile(rb"<script>window\.gradio_api_info = .*?;</script>", re.DOTALL)
_LOGGED_OUT = b'"auth_required":true'


class HideApiInfoWhenLoggedOut:
    """Pure ASGI middleware: buffers HTML page responses (not API, files or streams) and blanks the API info."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if scope["type"] != "http" or scope.get("method") != "GET" or "/gradio_api/" in path or "." in path.rsplit("/", 1)[-1]:
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        body = bytearray()
        passthrough = False

        async def capture(message):
            nonlocal start, passthrough
            if passthrough:
                await send(message)
                return
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    passthrough = True
                    await send(message)
                    return
                start = message
                return
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if message.get("more_body"):
                    return
                data = bytes(body)
                if _LOGGED_OUT in data:
                    data = _API_INFO.sub(b"<script>window.gradio_api_info = null;</script>", data)
                headers = [(k, v) for k, v in (start or {}).get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(data)).encode()))
                await send({**(start or {"type": "http.response.start", "status": 200}), "headers": headers})
                await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, capture)
