"""A verifying webhook receiver: what a system receiving AI Mass alerts should do.

It checks the HMAC-SHA256 signature (``X-Aimass-Signature: v2=hex(hmac(secret, ts + "." + key + "."
+ body))``, key = the ``Idempotency-Key`` header) and the timestamp's freshness, and acts on each
key once. Replays are refused: a stale or future timestamp, or a changed key or body, fails
the signature check (401); a fresh copy of a request already acted on is acknowledged without
acting again. Keys are remembered for ``keep_s`` (at least twice the tolerance, so no replay
can outlive the memory of its key, even from a sender whose clock is ahead). The demo and the end-to-end tests run it in a background thread.
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


def verify(secret: str, timestamp: str, key: str, body: bytes, signature: str, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """True when ``signature`` signs ``timestamp.key.body`` with ``secret`` and the timestamp is fresh."""
    if not timestamp.isdigit():
        return False
    age = abs((time.time() if now is None else now) - int(timestamp))
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, key, body), signature)


@dataclass
class WebhookReceiver:
    """An aiohttp receiver on 127.0.0.1:port/path in its own thread; ``events`` holds verified alarm events."""

    secret: str
    port: int
    path: str = "/aimass/alerts"
    host: str = "127.0.0.1"
    echo: bool = False  # print each verified event as one JSON line on stdout (the standalone receiver)
    tolerance_s: float = 300.0  # how far a request's timestamp may be from this clock
    keep_s: float = 86400.0     # how long keys acted on are remembered (never less than 2 x tolerance_s)
    events: list[dict] = field(default_factory=list)
    notifications: dict[str, float] = field(default_factory=dict)  # idempotency key -> received time
    duplicates: int = 0
    bad_signatures: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        if not verify(self.secret, request.headers.get("X-Aimass-Timestamp", ""), key, body,
                      request.headers.get("X-Aimass-Signature", ""), self.tolerance_s):
            self.bad_signatures += 1
            return web.Response(status=401, text="bad signature or stale timestamp")
        now = time.time()
        self.forget(now)
        if key in self.notifications:
            self.duplicates += 1  # already acted on (a retry or a replay): acknowledge, do nothing
            return web.Response(text="duplicate")
        self.notifications[key] = now
        events = json.loads(body)["events"]
        self.events.extend(events)
        if self.echo:
            print("\n".join(json.dumps(e, sort_keys=True) for e in events), flush=True)
        return web.Response(text="ok")

    def forget(self, now: float) -> None:
        """Drop keys older than ``keep_s`` (never those a request could still be replayed with)."""
        horizon = now - max(self.keep_s, 2 * self.tolerance_s)
        while self.notifications and next(iter(self.notifications.values())) < horizon:
            del self.notifications[next(iter(self.notifications))]

    def start(self) -> "WebhookReceiver":
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post(self.path, self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self.port).start()
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
        return f"http://{self.host}:{self.port}{self.path}"


def main(argv: list[str] | None = None) -> int:
    """``python -m aimass.receiver``: serve until killed, one JSON line per verified alarm event on stdout.

    The secret comes from $AIMASS_WEBHOOK_SECRET only (the local container run, deploy/local/)."""
    import argparse
    import os

    p = argparse.ArgumentParser(prog="python -m aimass.receiver", description=main.__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8099, help="port to listen on (default 8099)")
    p.add_argument("--path", default="/aimass/alerts", help="URL path of the webhook (default /aimass/alerts)")
    args = p.parse_args(argv)
    secret = os.environ.get("AIMASS_WEBHOOK_SECRET", "")
    if not secret:
        p.error("set AIMASS_WEBHOOK_SECRET to the alerter's webhook secret")
    WebhookReceiver(secret, args.port, args.path, host=args.host, echo=True).start()
    print(f"receiving alarm webhooks on http://{args.host}:{args.port}{args.path}", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
