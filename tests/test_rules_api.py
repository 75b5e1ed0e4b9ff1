"""The alarm API on a real aiohttp server: roles per endpoint, several tokens from the environment,
rate limits under a local flood (429 + Retry-After for the flooder, 200 for everyone else), malformed
bodies (400, never 500), silences, TLS with a self-signed certificate, and silenced alarms not notified."""
from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from aimass.core.config import AlertConfig, ConfigError
from aimass.core.procs import free_port
from aimass.core import contract
from aimass.rules.alarms import AlarmStore, StateDB
from aimass.rules.api import ApiHooks, api_tls_context, api_tokens, make_app, parse_tokens
from aimass.rules.engine import Engine
from aimass.rules.peers import Peers, parse_peers
from tests.fixtures_rules import offline_alerter, ruleset, tls_files, windows  # noqa: F401

RULE = """
rules:
  - name: hot
    stream: windows
    condition: mean > 80
    clear: mean < 75
"""
SECRETS = {"reader": "r" * 20, "operator": "o" * 20, "administrator": "a" * 20}
TOKENS_ENV = ",".join(f"{name}:{role}:{SECRETS[name]}" for name, role in
                      (("reader", "read"), ("operator", "operate"), ("administrator", "admin")))


def raised_store(tmp_path: Path, device_id: str = "dev-0") -> tuple[AlarmStore, str]:
    """An alarm store holding one active, unacknowledged alarm of ``device_id``; (store, its id)."""
    engine = Engine(ruleset(tmp_path, RULE))
    store = AlarmStore(StateDB(tmp_path / f"{device_id}.sqlite"))
    [event] = store.apply(engine.process("windows", windows(dict(window_end_ms=10_000, mean=90.0,
                                                                   device_id=device_id))))
    return store, event["alarm_id"]


class Api:
    """make_app served on 127.0.0.1 (HTTPS when ``tls``); ``published`` gets the events it persisted."""

    def __init__(self, store: AlarmStore, tokens_env: str = TOKENS_ENV, tls: ssl.SSLContext | None = None,
                 pipeline=None, peers: Peers | None = None, **settings):
        self.published: list[dict] = []
        self.reloads = 0
        alert = AlertConfig(**settings)
        alert.api_tokens_env, alert.api_token_env = "TEST_API_TOKENS", "TEST_API_TOKEN_UNSET"
        self.tokens = parse_tokens(tokens_env, "TEST_API_TOKENS")
        hooks = ApiHooks(self.on_events, lambda: {"rules": 1}, self.reload)
        if pipeline is not None:
            hooks.pipeline = pipeline
        self.app = make_app(store, self.tokens, hooks, alert, peers)
        self.tls = tls
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def on_events(self, events: list[dict]) -> None:
        self.published.extend(events)

    def reload(self) -> dict:
        self.reloads += 1
        return {"loaded": True}

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "Api":
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.tls).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def test_each_role_is_allowed_and_denied_per_endpoint(tmp_path):
    store, aid = raised_store(tmp_path)
    # endpoint -> (method, path, body, the least role it needs)
    endpoints = {"list": ("GET", "/alarms", None, "read"), "one": ("GET", f"/alarms/{aid}", None, "read"),
                 "status": ("GET", "/status", None, "read"),
                 "silence": ("POST", f"/alarms/{aid}/silence", {"for_s": 60}, "operate"),
                 "ack": ("POST", f"/alarms/{aid}/ack", {}, "operate"),
                 "reload": ("POST", "/rules/reload", None, "admin")}
    callers = {"nobody": {}, "wrong": {"Authorization": "Bearer " + "x" * 20},
               "reader": bearer("reader"), "operator": bearer("operator"), "administrator": bearer("administrator")}
    rank = {"nobody": -1, "wrong": -1, "reader": 0, "operator": 1, "administrator": 2}
    needed = {"read": 0, "operate": 1, "admin": 2}
    got: dict[tuple[str, str], int] = {}

    async def scenario(api: Api) -> None:
        async with api, aiohttp.ClientSession() as s:
            async with s.get(f"{api.base}/healthz") as r:
                assert r.status == 200
            for caller, headers in callers.items():
                for name, (method, path, body, _) in endpoints.items():
                    async with s.request(method, api.base + path, headers=headers, json=body) as r:
                        got[(caller, name)] = r.status
                        if r.status == 403:
                            assert "needs the" in (await r.json())["error"]

    api = Api(store)
    asyncio.run(scenario(api))
    want = {}
    for caller in callers:
        for name, (*_, role) in endpoints.items():
            if rank[caller] < 0:
                want[(caller, name)] = 401
            elif rank[caller] < needed[role]:
                want[(caller, name)] = 403
            else:  # the operator acknowledges first: the administrator finds nothing left to acknowledge
                want[(caller, name)] = 409 if (caller, name) == ("administrator", "ack") else 200
    assert got == want
    assert api.reloads == 1
    # the audit trail: every change names the token that made it, never its secret
    assert [(e["transition"], e["actor"]) for e in api.published] == [
        ("silenced", "operator"), ("acknowledged", "operator"), ("silenced", "administrator")]
    assert store.alarms[aid].acked_by == "operator"


def test_tokens_come_from_the_environment_and_bad_entries_are_refused_without_echoing_secrets(monkeypatch):
    monkeypatch.setenv("AIMASS_API_TOKENS", TOKENS_ENV)
    monkeypatch.setenv("AIMASS_API_TOKEN", "s" * 20)
    tokens = api_tokens(AlertConfig())
    assert [(t.name, t.role) for t in tokens] == [("reader", "read"), ("operator", "operate"),
                                                  ("administrator", "admin"), ("default", "admin")]
    assert SECRETS["reader"] not in repr(tokens)
    for bad in ("alice:root:" + "k" * 20, "alice:read:short", ":read:" + "k" * 20,
                f"a:read:{'k' * 20},a:admin:{'j' * 20}"):
        with pytest.raises(ValueError) as err:
            parse_tokens(bad, "AIMASS_API_TOKENS")
        assert "k" * 16 not in str(err.value)


def test_a_flooding_token_gets_429_with_retry_after_while_another_token_keeps_getting_200(tmp_path):
    store, _ = raised_store(tmp_path)
    rate, burst, flood = 50.0, 20, 4000
    statuses: list[int] = []
    retry_after: set[str] = set()
    other: list[int] = []

    async def scenario(api: Api) -> float:
        async with api, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
            async def flooder() -> None:
                # at least `flood` requests, and on until the other token has asked 10 times meanwhile
                while len(statuses) < flood or len(other) < 10:
                    async with s.get(f"{api.base}/alarms", headers=bearer("reader")) as r:
                        await r.read()
                        statuses.append(r.status)
                        if r.status == 429:
                            retry_after.add(r.headers["Retry-After"])

            async def polite() -> None:
                while len(statuses) < flood or len(other) < 10:
                    async with s.get(f"{api.base}/alarms", headers=bearer("operator")) as r:
                        other.append(r.status)
                    await asyncio.sleep(0.05)

            started = time.monotonic()
            await asyncio.gather(polite(), *(flooder() for _ in range(50)))
            return time.monotonic() - started

    elapsed = asyncio.run(scenario(Api(store, api_rate_per_s=rate, api_burst=burst)))
    assert len(statuses) >= flood and set(statuses) == {200, 429}
    assert statuses.count(200) <= burst + rate * elapsed + 1  # the bucket held
    assert statuses.count(429) >= len(statuses) - burst - rate * elapsed - 1
    assert retry_after == {"1"}
    assert len(other) >= 10 and set(other) == {200}  # the other token was never held back
    print(f"flood: {len(statuses)} requests in {elapsed:.1f} s, {statuses.count(200)} answered 200, "
          f"other token {len(other)} x 200")


def test_guessing_tokens_is_rate_limited_per_address_but_valid_tokens_still_pass(tmp_path):
    store, _ = raised_store(tmp_path)

    async def scenario(api: Api) -> tuple[list[int], str, int]:
        async with api, aiohttp.ClientSession() as s:
            guesses = []
            for i in range(30):
                async with s.get(f"{api.base}/alarms", headers={"Authorization": f"Bearer guess{i:016d}"}) as r:
                    guesses.append(r.status)
                    retry = r.headers.get("Retry-After", "")
            async with s.get(f"{api.base}/alarms", headers=bearer("reader")) as r:
                return guesses, retry, r.status

    guesses, retry, valid = asyncio.run(scenario(Api(store, api_address_rate_per_s=0.5, api_address_burst=10)))
    assert guesses == [401] * 10 + [429] * 20
    assert int(retry) >= 1
    assert valid == 200


BAD_BODIES = [
    ("ack", b"[]"), ("ack", b'"alice"'), ("ack", b"42"), ("ack", b"null"), ("ack", b"{not json"),
    ("ack", b'{"by": 5}'), ("ack", b'{"by": ["a"]}'), ("ack", b'{"by": true}'), ("ack", b"\xff\xfe{}"),
    ("silence", b"{}"), ("silence", b'{"for_s": "1h"}'), ("silence", b'{"for_s": true}'),
    ("silence", b'{"for_s": -5}'), ("silence", b'{"for_s": 1e12}'), ("silence", b"[60]"),
]


def test_malformed_bodies_get_400_never_500(tmp_path):
    store, aid = raised_store(tmp_path)

    async def scenario(api: Api) -> tuple[dict, int]:
        got = {}
        async with api, aiohttp.ClientSession() as s:
            for action, body in BAD_BODIES:
                async with s.post(f"{api.base}/alarms/{aid}/{action}", data=body,
                                  headers={**bearer("operator"), "Content-Type": "application/json"}) as r:
                    got[(action, body)] = (r.status, (await r.json())["error"])
            async with s.post(f"{api.base}/alarms/{aid}/ack", data=b'{"by": "' + b"x" * 20000 + b'"}',
                              headers=bearer("operator")) as r:
                too_big = r.status
        return got, too_big

    got, too_big = asyncio.run(scenario(Api(store)))
    assert {k: status for k, (status, _) in got.items()} == {k: 400 for k in BAD_BODIES}
    assert all("e.g." in error or "between" in error for _, error in got.values())  # says what it expects
    assert too_big == 413
    assert store.alarms[aid].state == "active_unack" and store.alarms[aid].silenced_until_ms == 0


def test_api_over_tls_with_a_self_signed_certificate(tmp_path, tls_files):
    cert, key = tls_files
    store, _ = raised_store(tmp_path)
    with pytest.raises(ConfigError, match="set together"):
        api_tls_context(AlertConfig(api_tls_cert_file=cert))
    server = api_tls_context(AlertConfig(api_tls_cert_file=cert, api_tls_key_file=key))
    trusted = ssl.create_default_context(cafile=cert)

    async def scenario(api: Api) -> tuple[int, str, str]:
        async with api, aiohttp.ClientSession() as s:
            async with s.get(f"{api.base}/alarms", headers=bearer("reader"), ssl=trusted) as r:
                ok = r.status
            try:  # an unknown CA is refused by the client
                async with s.get(f"{api.base}/alarms", headers=bearer("reader")) as r:
                    untrusted = f"HTTP {r.status}"
            except aiohttp.ClientConnectorCertificateError:
                untrusted = "certificate refused"
            try:  # plain HTTP gets no answer from the TLS port
                async with s.get(f"http://127.0.0.1:{api.port}/alarms", headers=bearer("reader")) as r:
                    plain = f"HTTP {r.status}"
            except aiohttp.ClientError as exc:
                plain = type(exc).__name__
        return ok, untrusted, plain

    ok, untrusted, plain = asyncio.run(scenario(Api(store, tls=server)))
    assert (ok, untrusted) == (200, "certificate refused")
    assert not plain.startswith("HTTP 2")


RULE_WITH_HOOK = """
receivers:
  hook: {kind: webhook, url: "http://127.0.0.1:9/hook", secret_env: TEST_HOOK_SECRET, group_wait: 0s}
rules:
  - name: hot
    stream: windows
    condition: mean > 80
    clear: mean < 75
    flapping: {changes: 10, within: 1m}
    receivers: [hook]
"""


def test_a_silenced_alarm_is_recorded_but_not_notified_until_the_silence_ends(tmp_path):
    alerter = offline_alerter(tmp_path, RULE_WITH_HOOK)
    cfg = alerter.cfg
    topic = contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix)

    def feed(end_ms: int, mean: float) -> list[str]:
        """Transitions the window raised; returns them."""
        before = alerter.db.queue_depth()
        alerter.process([(topic, contract.encode(windows(dict(window_end_ms=end_ms, mean=mean)), contract.WINDOWS))])
        rows = [row for _, _, row in alerter.db.queued()][before:]
        return [r["transition"] for r in rows]

    def notified() -> int:
        return sum(n for n, _ in alerter.outbox.waiting().values())

    try:
        assert feed(10_000, 90.0) == ["raised"] and notified() == 1
        [aid] = alerter.store.alarms
        event = alerter.store.silence(aid, 3600, actor="operator")
        alerter.persist([event])
        assert feed(20_000, 60.0) == ["cleared"] and feed(30_000, 95.0) == ["reraised"]
        assert notified() == 1  # recorded, not notified
        alerter.persist([alerter.store.silence(aid, 0, actor="operator")])
        assert feed(40_000, 60.0) == ["cleared"] and notified() == 2
        stored = [r for _, _, r in alerter.db.queued() if r["transition"] in ("silenced", "unsilenced")]
        assert [(r["transition"], r["actor"], r["rule"]) for r in stored] == [
            ("silenced", "operator", "hot"), ("unsilenced", "operator", "hot")]
    finally:
        alerter.close()


def test_every_replica_answers_for_all_alarms_and_forwards_to_the_owner(tmp_path):
    """Two alerters, each holding the alarms of its own partitions, and a third peer address that is
    down: either replica lists both alarms (naming the dead one), acknowledges the other's alarm
    there (recorded by the other, with the caller's token as the actor), and ?local=1 stays local."""
    store_a, alarm_a = raised_store(tmp_path, "dev-a")
    store_b, alarm_b = raised_store(tmp_path, "dev-b")
    ports, dead = (free_port(), free_port()), free_port()
    names = ",".join(f"127.0.0.1:{p}" for p in (*ports, dead))

    def replica(store: AlarmStore, port: int) -> Api:
        api = Api(store, peers=Peers(parse_peers(names), None, timeout_s=2.0))
        api.port = port
        return api

    a, b = replica(store_a, ports[0]), replica(store_b, ports[1])

    async def scenario() -> dict:
        got = {}
        async with a, b, aiohttp.ClientSession() as s:
            async def call(method: str, url: str, who: str = "operator", body: dict | None = None):
                async with s.request(method, url, headers=bearer(who), json=body) as r:
                    return r.status, await r.json()
            got["list_a"] = await call("GET", f"{a.base}/alarms")
            got["list_b"] = await call("GET", f"{b.base}/alarms")
            got["local_a"] = await call("GET", f"{a.base}/alarms?local=1")
            got["reader_ack"] = await call("POST", f"{a.base}/alarms/{alarm_b}/ack", "reader", {})
            got["ack_b_via_a"] = await call("POST", f"{a.base}/alarms/{alarm_b}/ack", body={"by": "alice"})
            got["one_b_via_a"] = await call("GET", f"{a.base}/alarms/{alarm_b}")
            got["unknown"] = await call("GET", f"{a.base}/alarms/nosuchalarm")
        return got

    got = asyncio.run(scenario())
    dead_peer = [f"127.0.0.1:{dead}"]
    for name in ("list_a", "list_b"):
        status, doc = got[name]
        assert status == 200 and {x["alarm_id"] for x in doc["alarms"]} == {alarm_a, alarm_b}, got[name]
        assert doc["unreachable"] == dead_peer
    assert got["local_a"] == (200, {"alarms": [got["local_a"][1]["alarms"][0]]})
    assert got["local_a"][1]["alarms"][0]["alarm_id"] == alarm_a
    assert got["reader_ack"][0] == 403  # the role is checked before anything is forwarded
    status, doc = got["ack_b_via_a"]
    assert status == 200 and doc["alarm_id"] == alarm_b and doc["acked_by"] == "alice", got["ack_b_via_a"]
    assert store_b.alarms[alarm_b].acked_by == "alice" and store_a.alarms[alarm_a].acked_by == ""
    assert [(e["transition"], e["actor"]) for e in b.published] == [("acknowledged", "operator")]
    assert a.published == []
    assert got["one_b_via_a"][1]["state"] == "active_ack"
    # an id nobody holds: not "no such alarm" while a peer is down, since it might be the owner
    assert got["unknown"][0] == 503 and dead_peer[0] in got["unknown"][1]["error"]


def test_bad_peer_lists_are_refused_with_the_key_and_an_example():
    for bad in ("alerter", "alerter:http", ":8080", "alerter:70000"):
        with pytest.raises(ConfigError, match="alert.api_peers.*host:port"):
            parse_peers(bad)
    assert parse_peers(" a:1, [::1]:8080 ,") == [("a", 1), ("::1", 8080)]
