"""HTTP hardening on top of gradio's own auth.

With auth on, gradio answers every data route (config, API, queue, uploads, file downloads) with 401 until the
user logs in, but the login page itself embeds ``window.gradio_api_info``: the full API description, including
component defaults such as run names and the model path. ``HideApiInfoWhenLoggedOut`` blanks that object on
pages rendered for a logged-out visitor (their config says ``"auth_required": true``).

Gradio's ``POST /login`` answers a wrong password at once, every time. ``ThrottleLogins`` puts a per-address
``LoginThrottle`` in front of it: growing delays after a few failures, then a temporary lockout (429).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time

log = logging.getLogger("peft_studio.security")

_API_INFO = re.compile(rb"<script>window\.gradio_api_info = .*?;</script>", re.DOTALL)
_LOGGED_OUT = b'"auth_required":true'


class HtmlPageRewriter:
    """Pure ASGI middleware: buffers HTML page responses (not API, files or streams) and passes their body through
    ``rewrite``; everything else streams through untouched."""

    def __init__(self, app):
        self.app = app

    def rewrite(self, data: bytes) -> bytes:
        return data

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        # every GET page, /gradio_api/ ones too (gradio 6 renders the app page at /gradio_api/runs); only HTML
        # responses are buffered, so streams and files pass through untouched
        if scope["type"] != "http" or scope.get("method") != "GET" or "." in path.rsplit("/", 1)[-1]:
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
                data = self.rewrite(bytes(body))
                headers = [(k, v) for k, v in (start or {}).get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(data)).encode()))
                await send({**(start or {"type": "http.response.start", "status": 200}), "headers": headers})
                await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, capture)


class HideApiInfoWhenLoggedOut(HtmlPageRewriter):
    """Blanks the API info on pages rendered for a logged-out visitor."""

    def rewrite(self, data: bytes) -> bytes:
        if _LOGGED_OUT in data:
            data = _API_INFO.sub(b"<script>window.gradio_api_info = null;</script>", data)
        return data


class LoginThrottle:
    """Failed sign-ins per client address: growing delays, then a temporary lockout.

    After ``free`` failures in a row, each further attempt from that address waits ``base · 2^(k−1)`` seconds
    (k = failures beyond ``free``, capped at ``cap``) before it is checked; after ``lock_after`` failures the address
    is refused outright for ``lock_s`` seconds. A success clears the address's record, and so does ``lock_s`` of
    quiet. Passwords themselves are compared by gradio in constant time (``secrets.compare_digest``)."""

    def __init__(self, free: int = 3, base: float = 1.0, cap: float = 30.0, lock_after: int = 10,
                 lock_s: float = 300.0, clock=time.monotonic):
        self.free, self.base, self.cap, self.lock_after, self.lock_s = free, base, cap, lock_after, lock_s
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (failures in a row, time of the last one)

    def _record(self, addr: str) -> tuple[int, float]:
        n, last = self._failures.get(addr, (0, 0.0))
        if n and self.clock() - last >= self.lock_s:
            self._failures.pop(addr, None)
            return 0, 0.0
        return n, last

    def locked_for(self, addr: str) -> float:
        """Seconds this address stays locked out (0 when it may try)."""
        n, last = self._record(addr)
        return max(0.0, self.lock_s - (self.clock() - last)) if n >= self.lock_after else 0.0

    def delay(self, addr: str) -> float:
        """Seconds to wait before checking this address's next attempt."""
        n, _ = self._record(addr)
        return 0.0 if n < self.free else min(self.cap, self.base * 2 ** (n - self.free))

    def failed(self, addr: str) -> int:
        n, _ = self._record(addr)
        self._failures[addr] = (n + 1, self.clock())
        return n + 1

    def succeeded(self, addr: str) -> None:
        self._failures.pop(addr, None)


class ThrottleLogins:
    """Pure ASGI middleware in front of gradio's ``POST /login``: applies a LoginThrottle per client address,
    answers a locked-out address with 429 and Retry-After, and logs every attempt's outcome."""

    def __init__(self, app, throttle: LoginThrottle | None = None):
        self.app = app
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith("/login"):
            await self.app(scope, receive, send)
            return
        addr = (scope.get("client") or ("?", 0))[0]
        locked = self.throttle.locked_for(addr)
        if locked > 0:
            log.warning("sign-in refused: %s is locked out for %.0f s more", addr, locked)
            body = json.dumps({"detail": f"Too many failed sign-ins from this address; try again in "
                                         f"{math.ceil(locked)} s."}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(math.ceil(locked)).encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        wait = self.throttle.delay(addr)
        if wait > 0:
            await asyncio.sleep(wait)
        status: list[int] = []

        async def watch(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] == 200:
            self.throttle.succeeded(addr)
            log.info("sign-in from %s succeeded", addr)
        elif status and status[0] in (400, 401):
            n = self.throttle.failed(addr)
            log.warning("sign-in from %s failed (%d in a row%s)", addr, n,
                        "; now locked out" if n >= self.throttle.lock_after else "")
