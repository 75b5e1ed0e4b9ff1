"""The alarm HTTP API (aiohttp), served by the alerter process.

    GET  /healthz                    no auth
    GET  /alarms[?all=1]             active and cleared-unacknowledged alarms (all=1: every alarm)
    GET  /alarms/{id}                one alarm
    POST /alarms/{id}/ack            body {"by": "name"}; 404 unknown, 409 nothing to acknowledge

Every route but /healthz needs ``Authorization: Bearer <token>``, the token being the value of the
env var named by ``alert.api_token_env``. With that variable unset the API refuses every request.
"""
from __future__ import annotations

import hmac
import math
from dataclasses import asdict
from typing import Awaitable, Callable

from aiohttp import web

from aimass.rules.alarms import Alarm, AlarmStore

OnEvents = Callable[[list[dict]], Awaitable[None]]


def alarm_json(alarm: Alarm) -> dict:
    doc = asdict(alarm)
    doc.pop("changes_ms")
    if isinstance(doc["value"], float) and not math.isfinite(doc["value"]):
        doc["value"] = None
    return doc


def make_app(store: AlarmStore, token: str, on_events: OnEvents) -> web.Application:
    """The API application; ``on_events`` persists and publishes acknowledgement events."""

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path == "/healthz":
            return await handler(request)
        if not token:
            return web.json_response({"error": "the API token is not configured on the alerter"}, status=401)
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        return await handler(request)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "active": store.active_count()})

    async def list_alarms(request: web.Request) -> web.Response:
        include_all = request.query.get("all", "") in ("1", "true", "yes")
        return web.json_response({"alarms": [alarm_json(a) for a in store.listing(include_all)]})

    async def get_alarm(request: web.Request) -> web.Response:
        alarm = store.alarms.get(request.match_info["id"])
        if alarm is None:
            return web.json_response({"error": "no such alarm"}, status=404)
        return web.json_response(alarm_json(alarm))

    async def ack(request: web.Request) -> web.Response:
        aid = request.match_info["id"]
        if aid not in store.alarms:
            return web.json_response({"error": "no such alarm"}, status=404)
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "body must be JSON, e.g. {\"by\": \"alice\"}"}, status=400)
        by = str((body or {}).get("by", "api"))[:100]
        event = store.acknowledge(aid, by)
        if event is None:
            return web.json_response({"error": f"alarm is {store.alarms[aid].state}: nothing to acknowledge"},
                                     status=409)
        await on_events([event])
        return web.json_response(alarm_json(store.alarms[aid]))

    app = web.Application(middlewares=[auth])
    app.add_routes([web.get("/healthz", healthz), web.get("/alarms", list_alarms),
                    web.get("/alarms/{id}", get_alarm), web.post("/alarms/{id}/ack", ack)])
    return app
