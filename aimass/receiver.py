"""A verifying webhook receiver: what a system receiving AI Mass alerts should do.

It checks the HMAC-SHA256 signature (``X-Aimass-Signature: v1=hex(hmac(secret, ts + "." + body))``)
and the timestamp's freshness, acts on each ``Idempotency-Key`` once, and keeps what it got.
The demo and the end-to-end tests run it in a background thread.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web

from aimass.rules.delivery import sign


def verify(secret: str, timestamp: str, body: bytes, signature: str, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """True when ``signature`` signs ``timestamp.body`` with ``secret`` and the timestamp is fresh."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass
class WebhookReceiver:
    """An aiohttp receiver on 127.0.0.1:port/path in its own thread; ``events`` holds verified alarm events."""

    secret: str
    port: int
    path: str = "/aimass/alerts"
    events: list[dict] = field(default_factory=list)
    notifications: dict[str, float] = field(default_factory=dict)  # idempotency key -> received time
    duplicates: int = 0
    bad_signatures: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(self.secret, request.headers.get("X-Aimass-Timestamp", ""), body,
                      request.headers.get("X-Aimass-Signature", "")):
            self.bad_signatures += 1
            return web.Response(status=401, text="bad signature")
        key = request.headers.get("Idempotency-Key", "")
        if key in self.notifications:
            self.duplicates += 1  # already acted on: acknowledge, do nothing
            return web.Response(text="duplicate")
        self.notifications[key] = time.time()
        self.events.extend(json.loads(body)["events"])
        return web.Response(text="ok")

    def start(self) -> "WebhookReceiver":
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post(self.path, self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            ready.set()

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"
