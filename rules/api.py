"""The alarm HTTP API (aiohttp), served by the alerter process.

    GET  /healthz                    no token (rate limited per address)
    GET  /alarms[?all=1]             read     active and cleared-unacknowledged alarms (all=1: every alarm)
                                              (with peers: {"alarms": [...], "unreachable": [peers]})
    GET  /alarms/{id}                read     one alarm
    GET  /status                     read     stage health: rules, consumer lag, Kafka and delivery state
    POST /alarms/{id}/ack            operate  body {"by": "name"}; 404 unknown, 409 nothing to acknowledge
    POST /alarms/{id}/silence        operate  body {"for_s": 3600}: hold back its notifications (0 lifts it)
    POST /rules/reload               admin    re-read the rule files now
    POST /pipeline-alerts            ingest   Alertmanager's webhook JSON (version 4): alerts on the pipeline
                                              itself become alarms (``aimass.rules.pipeline``); 400 with the
                                              reason for any other body, 503 + Retry-After when this alerter
                                              does not hold the pipeline alarms' partition (another one does)

Tokens come only from the environment (``api_tokens``): ``alert.api_tokens_env`` holds
``name:role:secret`` entries separated by commas, and ``alert.api_token_env`` (the variable
`aimass alerts` sends) adds one admin token named ``default``. Roles nest: admin > operate > read;
``ingest`` (for Alertmanager) may only post pipeline alerts, which admin may too.
Secrets are compared with ``hmac.compare_digest`` and never logged; the token's *name* is the
actor recorded on acknowledgement and silence events (the audit trail in the store).

Rate limits (token buckets): each token has its own (``api_rate_per_s``, ``api_burst``), so one
flooding client never starves another; requests without a valid token (guesses, /healthz) share
a bucket per client address. Both answer 429 with ``Retry-After``. With
``alert.api_tls_cert_file`` and ``alert.api_tls_key_file`` set it serves HTTPS only (TLS 1.2+). Bodies must be JSON objects
with fields of the right type (400 otherwise) and at most ``api_max_body_bytes`` (413;
``pipeline_max_body_bytes`` for /pipeline-alerts, since Alertmanager sends a whole group).
With no token configured the API refuses every request.

With ``alert.api_peers`` set, a replica answers for every alerter of the deployment
(``aimass.rules.peers``): lists merge all replicas' alarms, and a request about an alarm another
replica holds is forwarded to it (``?local=1`` asks one replica about its own alarms only).
"""
from __future__ import annotations

import hmac
import json
import math
import ssl
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from aimass.core.config import AlertConfig, Config, ConfigError
from aimass.rules.alarms import Alarm, AlarmStore
from aimass.rules.delivery import TokenBucket
from aimass.rules.pipeline import PipelineAlert, parse_webhook
from aimass.rules.peers import FORWARDED, INSTANCE_HEADER, Peers, merged_alarms, owner_answer

OnEvents = Callable[[list[dict]], Awaitable[None]]
# role -> the roles whose endpoints it may use
GRANTS = {"read": ("read",), "operate": ("read", "operate"), "admin": ("read", "operate", "admin", "ingest"),
          "ingest": ("ingest",)}
ROLES = tuple(GRANTS)
MAX_SILENCE_S = 30 * 86400
MAX_TRACKED_ADDRESSES = 10_000


@dataclass(frozen=True)
class ApiToken:
    """One API token: a name (the actor in the audit trail), a role, and the secret (never printed)."""

    name: str
    role: str
    secret: str = field(repr=False)

    def allows(self, role: str) -> bool:
        return role in GRANTS[self.role]


def parse_tokens(text: str, source: str) -> list[ApiToken]:
    """Tokens from ``name:role:secret,...``; ValueError naming the bad entry by position (never its secret)."""
    tokens = []
    for i, entry in enumerate(e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, role, secret = (entry.split(":", 2) + ["", ""])[:3]
        if not name or role not in ROLES or len(secret) < 16:
            raise ValueError(f"{source}: entry {i + 1} must be name:role:secret with role one of "
                             f"{', '.join(ROLES)} and a secret of at least 16 characters")
        tokens.append(ApiToken(name, role, secret))
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: token names must be unique (they identify who acted)")
    return tokens


def api_tokens(a: AlertConfig) -> list[ApiToken]:
    """Every token the alerter accepts, from the environment."""
    tokens = parse_tokens(Config.secret(a.api_tokens_env), a.api_tokens_env)
    if single := Config.secret(a.api_token_env):
        tokens.append(ApiToken("default", "admin", single))
    return tokens


def api_tls_context(a: AlertConfig) -> ssl.SSLContext | None:
    """The API's server TLS context (TLS 1.2+) when alert.api_tls_cert_file and alert.api_tls_key_file are set."""
    if not (a.api_tls_cert_file or a.api_tls_key_file):
        return None
    if not (a.api_tls_cert_file and a.api_tls_key_file):
        raise ConfigError("alert.api_tls_cert_file and alert.api_tls_key_file must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(a.api_tls_cert_file, a.api_tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"alert.api_tls_cert_file / alert.api_tls_key_file: cannot load them: {exc}") from None
    return context


class RateLimiter:
    """One token bucket per key (a token name or a client address)."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, TokenBucket] = {}

    def retry_after_s(self, key: str) -> float:
        """0 when ``key`` may go on (a token is taken); else seconds until it may."""
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_TRACKED_ADDRESSES:
                self.buckets.clear()  # bounded memory under a flood from many addresses
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        return 0.0 if bucket.take() else bucket.retry_after_s()


def too_many(retry_s: float, who: str) -> web.Response:
    return web.json_response({"error": f"rate limit of {who} exceeded; retry after the Retry-After seconds"},
                             status=429, headers={"Retry-After": str(max(1, math.ceil(retry_s)))})


def alarm_json(alarm: Alarm) -> dict:
    doc = asdict(alarm)
    doc.pop("changes_ms")
    if isinstance(doc["value"], float) and not math.isfinite(doc["value"]):
        doc["value"] = None
    return doc


TOKEN = web.RequestKey("token", object)  # the request's ApiToken, None without a valid one


class BadRequest(Exception):
    """A request body the API cannot use; the message says what it expects."""


class Unavailable(Exception):
    """This alerter cannot take the request now (another one can, or it can later): 503 + Retry-After."""


async def body_bytes(request: web.Request, limit: int) -> bytes:
    """The raw body, at most ``limit`` bytes (413 beyond, before reading it when the length is declared)."""
    if (request.content_length or 0) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()
    if len(raw) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
    return raw


def parse_json(raw: bytes, example: str) -> Any:
    """The body's JSON value; BadRequest (showing ``example``) when it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError:
        raise BadRequest(f"body must be JSON, e.g. {example}") from None


async def json_object(request: web.Request, fields: dict[str, tuple[type, ...]], example: str, limit: int) -> dict:
    """The body (at most ``limit`` bytes) as a JSON object whose known ``fields`` have the given types
    (empty body = {})."""
    raw = await body_bytes(request, limit)
    if not raw.strip():
        return {}
    body = parse_json(raw, example)
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, e.g. {example}")
    for name, types in fields.items():
        if name in body and (not isinstance(body[name], types) or isinstance(body[name], bool)):
            raise BadRequest(f"{name!r} must be a {' or '.join(t.__name__ for t in types)}, e.g. {example}")
    return body


async def not_served(alerts: list[PipelineAlert]) -> dict:
    """The pipeline hook of an API that takes no pipeline alerts."""
    raise Unavailable("this alarm API takes no pipeline alerts")


@dataclass
class ApiHooks:
    """What the API needs from the alerter beyond the alarm store."""

    on_events: OnEvents                                   # persist and publish ack / silence events
    status: Callable[[], dict] = dict                     # GET /status
    reload: Callable[[], dict] = dict                     # POST /rules/reload
    # POST /pipeline-alerts: apply and persist the alerts; what happened (JSON-able), or Unavailable
    pipeline: Callable[[list[PipelineAlert]], Awaitable[dict]] = not_served


def make_app(store: AlarmStore, tokens: list[ApiToken], hooks: ApiHooks, settings: AlertConfig,
             peers: Peers | None = None) -> web.Application:
    """The API application; with ``peers``, it answers for every alerter replica."""
    per_token = RateLimiter(settings.api_rate_per_s, settings.api_burst)
    per_address = RateLimiter(settings.api_address_rate_per_s, settings.api_address_burst)

    def authenticate(header: str) -> ApiToken | None:
        given = header.removeprefix("Bearer ").encode() if header.startswith("Bearer ") else b""
        found = None
        for t in tokens:  # no early exit: the time taken does not say which token matched
            if hmac.compare_digest(given, t.secret.encode()):
                found = t
        return found

    @web.middleware
    async def guard(request: web.Request, handler):
        token = authenticate(request.headers.get("Authorization", ""))
        if token is None:
            address = request.remote or "?"
            if (wait := per_address.retry_after_s(address)) > 0:
                return too_many(wait, f"address {address}")
            if request.path != "/healthz":
                why = "missing or wrong bearer token" if tokens else "no API token is configured on the alerter"
                return web.json_response({"error": why}, status=401)
        elif (wait := per_token.retry_after_s(token.name)) > 0:
            return too_many(wait, f"token {token.name!r}")
        request[TOKEN] = token
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = web.json_response({"error": str(exc)}, status=400)
        except Unavailable as exc:
            response = web.json_response({"error": str(exc)}, status=503, headers={"Retry-After": "1"})
            response.force_close()  # the retry's new connection may reach another alerter
        if peers is not None:
            response.headers[INSTANCE_HEADER] = peers.instance
        return response

    def needs(role: str, handler: Callable[[web.Request], Awaitable[web.Response]]):
        async def checked(request: web.Request) -> web.Response:
            token: ApiToken | None = request[TOKEN]
            if token is None or not token.allows(role):
                return web.json_response({"error": f"this needs the {role} role; token "
                                                   f"{token.name if token else '-'!r} does not have it"}, status=403)
            return await handler(request)
        return checked

    def fan_out(request: web.Request) -> bool:
        """Whether this request is answered with the other replicas' help (not one they forwarded)."""
        return peers is not None and request.query.get(FORWARDED[0]) != FORWARDED[1]

    def elsewhere(handler: Callable[[web.Request], Awaitable[web.Response]]):
        """``handler`` for an alarm this replica holds; otherwise the answer of the replica that does."""
        async def routed(request: web.Request) -> web.Response:
            if request.match_info["id"] in store.alarms or not fan_out(request):
                return await handler(request)
            query = {k: v for k, v in request.query.items() if k != FORWARDED[0]}
            answer = owner_answer(await peers.ask_all(request.method, request.path, query, dict(request.headers),
                                                      await request.read()))
            return web.json_response(answer.body, status=answer.status)
        return routed

    def known(request: web.Request) -> str:
        aid = request.match_info["id"]
        if aid not in store.alarms:
            raise web.HTTPNotFound(text=json.dumps({"error": "no such alarm"}), content_type="application/json")
        return aid

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "active": store.active_count()})

    async def list_alarms(request: web.Request) -> web.Response:
        include_all = request.query.get("all", "") in ("1", "true", "yes")
        own = [alarm_json(a) for a in store.listing(include_all)]
        if not fan_out(request):
            return web.json_response({"alarms": own})
        query = {"all": "1"} if include_all else {}
        answers = await peers.ask_all("GET", request.path, query, dict(request.headers))
        return web.json_response(merged_alarms(own, answers))

    async def get_alarm(request: web.Request) -> web.Response:
        return web.json_response(alarm_json(store.alarms[known(request)]))

    async def status(request: web.Request) -> web.Response:
        return web.json_response(hooks.status())

    async def ack(request: web.Request) -> web.Response:
        aid = known(request)
        token: ApiToken = request[TOKEN]
        body = await json_object(request, {"by": (str,)}, '{"by": "alice"}', settings.api_max_body_bytes)
        event = store.acknowledge(aid, body.get("by", token.name)[:100], actor=token.name)
        if event is None:
            return web.json_response({"error": f"alarm is {store.alarms[aid].state}: nothing to acknowledge"},
                                     status=409)
        await hooks.on_events([event])
        return web.json_response(alarm_json(store.alarms[aid]))

    async def silence(request: web.Request) -> web.Response:
        aid = known(request)
        body = await json_object(request, {"for_s": (int, float)}, '{"for_s": 3600}', settings.api_max_body_bytes)
        for_s: Any = body.get("for_s")
        if for_s is None or not 0 <= for_s <= MAX_SILENCE_S:
            raise BadRequest(f"'for_s' (seconds, 0 lifts the silence) must be between 0 and {MAX_SILENCE_S}")
        event = store.silence(aid, for_s, actor=request[TOKEN].name)
        await hooks.on_events([event])
        return web.json_response(alarm_json(store.alarms[aid]))

    async def reload(request: web.Request) -> web.Response:
        return web.json_response(hooks.reload())

    async def pipeline_alerts(request: web.Request) -> web.Response:
        raw = await body_bytes(request, settings.pipeline_max_body_bytes)
        try:
            alerts = parse_webhook(parse_json(raw, '{"version": "4", "alerts": [...]}'))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return web.json_response(await hooks.pipeline(alerts))

    app = web.Application(middlewares=[guard],
                          client_max_size=max(settings.api_max_body_bytes, settings.pipeline_max_body_bytes))
    if peers is not None:
        app.on_cleanup.append(lambda _app: peers.close())
    app.add_routes([web.get("/healthz", healthz),
                    web.get("/alarms", needs("read", list_alarms)),
                    web.get("/alarms/{id}", needs("read", elsewhere(get_alarm))),
                    web.get("/status", needs("read", status)),
                    web.post("/alarms/{id}/ack", needs("operate", elsewhere(ack))),
                    web.post("/alarms/{id}/silence", needs("operate", elsewhere(silence))),
                    web.post("/rules/reload", needs("admin", reload)),
                    web.post("/pipeline-alerts", needs("ingest", pipeline_alerts))])
    return app
