"""Failed sign-ins are throttled per client address: growing delays, a temporary lockout, release afterwards."""

import asyncio

import httpx

from studio.security import LoginThrottle, ThrottleLogins


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_delays_grow_then_lock_then_release():
    clock = Clock()
    t = LoginThrottle(free=3, base=1.0, cap=8.0, lock_after=6, lock_s=60.0, clock=clock)
    delays = []
    for _ in range(6):
        delays.append(t.delay("1.2.3.4"))
        t.failed("1.2.3.4")
    assert delays == [0, 0, 0, 1.0, 2.0, 4.0]
    assert t.locked_for("1.2.3.4") == 60.0 and t.delay("5.6.7.8") == 0  # other addresses are not affected
    clock.now += 59
    assert t.locked_for("1.2.3.4") == 1.0
    clock.now += 1
    assert t.locked_for("1.2.3.4") == 0 and t.delay("1.2.3.4") == 0  # a quiet lock_s clears the record


def test_a_success_clears_the_record():
    t = LoginThrottle(free=1, base=1.0, clock=Clock())
    t.failed("a"), t.failed("a")
    assert t.delay("a") == 2.0
    t.succeeded("a")
    assert t.delay("a") == 0


async def _login_app(scope, receive, send):
    """Stands in for gradio: /login answers 200 for password 'right', else 400; other routes 200."""
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    ok = b"password=right" in body or scope["path"] != "/login"
    await send({"type": "http.response.start", "status": 200 if ok else 400, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_middleware_counts_failures_per_address_and_answers_429_when_locked(monkeypatch):
    slept = []

    async def fake_sleep(s):
        slept.append(s)

    monkeypatch.setattr("studio.security.asyncio.sleep", fake_sleep)
    throttle = LoginThrottle(free=2, base=0.5, lock_after=4, lock_s=30.0, clock=Clock())
    app = ThrottleLogins(_login_app, throttle)

    async def attempts():
        transport = httpx.ASGITransport(app=app, client=("9.9.9.9", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://studio") as c:
            codes = [(await c.post("/login", data={"username": "u", "password": "wrong"})).status_code
                     for _ in range(5)]
            locked = await c.post("/login", data={"username": "u", "password": "right"})
            other = await c.get("/")  # not the login route: untouched
            return codes, locked, other.status_code

    codes, locked, other = asyncio.run(attempts())
    assert codes == [400, 400, 400, 400, 429]
    assert slept == [0.5, 1.0]  # the 3rd and 4th attempts waited; the 5th was refused before any check
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) == 30
    assert "try again in 30 s" in locked.json()["detail"]
    assert other == 200


def test_the_running_studio_throttles_its_login_page(tmp_path, tiny_model_dir):
    """Against a real studio with --auth: wrong passwords get slower, then 429; the right one is refused while
    locked out. (The 30 wrong passwords of the issue each got an immediate 400 before.)"""
    import time

    from test_studio_api import start_app

    throttle = LoginThrottle(free=2, base=0.3, lock_after=4, lock_s=60.0)
    ctx, demo, url = start_app(tmp_path / "data", tiny_model_dir, auth=("ada", "s3cret-pass"), throttle=throttle)
    try:
        codes, times = [], []
        for _ in range(5):
            t = time.perf_counter()
            codes.append(httpx.post(url + "login", data={"username": "ada", "password": "nope"}, timeout=30).status_code)
            times.append(time.perf_counter() - t)
        assert codes == [400, 400, 400, 400, 429]
        assert times[2] >= 0.3 and times[3] >= 0.6  # the delays grow
        right = httpx.post(url + "login", data={"username": "ada", "password": "s3cret-pass"}, timeout=30)
        assert right.status_code == 429 and "try again in" in right.json()["detail"]
    finally:
        demo.close()
        ctx.close()
