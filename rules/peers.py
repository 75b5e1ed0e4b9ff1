"""The alarm API across alerter replicas: one answer whichever replica a request reaches.

With several alerters each holds the alarms of the partitions it owns, so behind one Service
(Kubernetes) or service name (compose) a request would see only a share of them. With
``alert.api_peers`` set (``host:port`` entries; a name such as a headless Service resolves to
every replica's address), a replica answers

- ``GET /alarms``: its own alarms merged with every peer's (asked with ``?local=1``); peers that
  did not answer are named in ``unreachable`` so a partial list never looks complete;
- ``GET /alarms/{id}``, ``POST .../ack``, ``.../silence`` for an alarm it does not hold: the
  request is forwarded (``?local=1``) to the peers and the owner's answer is returned as is.

The caller's ``Authorization`` header is forwarded, so a peer checks the same token, applies the
same role and rate limit and records the same actor. Every API answer carries the process's
``X-Aimass-Alerter`` id, which lets a replica recognise (and skip) its own answer when the peer
name also resolves to itself. Failure handling: each peer has ``alert.api_peer_timeout_s``; an
unreachable peer is reported, never waited on longer, and never fails the whole request.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from dataclasses import dataclass

import aiohttp

from aimass.core.config import AlertConfig, ConfigError

INSTANCE_HEADER = "X-Aimass-Alerter"
FORWARDED = ("local", "1")  # the query a forwarded request carries: answer from your own alarms only


def parse_peers(text: str) -> list[tuple[str, int]]:
    """``host:port,...`` as (host, port) pairs; ConfigError naming the bad entry."""
    peers = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"config key alert.api_peers: {entry!r} is not host:port "
                              f"(e.g. aimass-alerter-peers:8080, a name resolving to every alerter)")
        peers.append((host.strip("[]"), int(port)))
    return peers


@dataclass(frozen=True)
class PeerAnswer:
    """One peer's answer: its address, HTTP status and JSON body; status 0 = unreachable."""

    address: str
    status: int
    body: dict


class Peers:
    """The other alerter replicas of a deployment, found by name on every call."""

    def __init__(self, peers: list[tuple[str, int]], tls: ssl.SSLContext | None, timeout_s: float):
        self.peers, self.tls, self.timeout_s = peers, tls, timeout_s
        self.instance = uuid.uuid4().hex  # this process, in every answer's INSTANCE_HEADER
        self.session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, a: AlertConfig) -> "Peers | None":
        """The configured peers (None when ``alert.api_peers`` is empty); HTTPS when the API serves TLS."""
        peers = parse_peers(a.api_peers)
        if not peers:
            return None
        tls = None
        if a.api_tls_cert_file:
            tls = ssl.create_default_context(cafile=a.api_tls_ca_file or None)
        return cls(peers, tls, a.api_peer_timeout_s)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _targets(self) -> list[tuple[str, str, int]]:
        """(host name, address, port) of every address the peer names resolve to."""
        loop = asyncio.get_running_loop()
        out = []
        for host, port in self.peers:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                out.append((host, host, port))  # reported unreachable by the request itself
                continue
            for address in dict.fromkeys(info[4][0] for info in infos):
                out.append((host, address, port))
        return out

    async def _ask(self, host: str, address: str, port: int, method: str, path: str, query: dict,
                   headers: dict, body: bytes) -> PeerAnswer | None:
        """One peer's answer; None when the answer came from this process."""
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        scheme = "https" if self.tls else "http"
        shown = f"[{address}]" if ":" in address else address
        try:
            async with self.session.request(
                    method, f"{scheme}://{shown}:{port}{path}", params={**query, FORWARDED[0]: FORWARDED[1]},
                    headers=headers, data=body or None, ssl=self.tls or False, allow_redirects=False,
                    server_hostname=host if self.tls else None) as r:
                if r.headers.get(INSTANCE_HEADER) == self.instance:
                    return None
                try:
                    doc = await r.json(content_type=None)
                except ValueError:
                    doc = {"error": "the peer's answer is not JSON"}
                return PeerAnswer(f"{address}:{port}", r.status, doc if isinstance(doc, dict) else {})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return PeerAnswer(f"{address}:{port}", 0, {"error": f"unreachable: {type(exc).__name__}"})

    async def ask_all(self, method: str, path: str, query: dict, headers: dict, body: bytes = b"") -> list[PeerAnswer]:
        """Every other replica's answer to the same request (forwarded with ``?local=1``)."""
        forward = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")}
        answers = await asyncio.gather(*(self._ask(host, address, port, method, path, query, forward, body)
                                         for host, address, port in await self._targets()))
        return [a for a in answers if a is not None]


def _changed_ms(alarm: dict) -> int:
    return max(alarm["last_ms"], alarm["acked_ms"])


def merged_alarms(own: list[dict], answers: list[PeerAnswer]) -> dict:
    """``GET /alarms`` over every replica, newest first: alarms by id (the most recently changed copy
    wins, e.g. during a hand-over) and the peers that did not answer."""
    by_id = {a["alarm_id"]: a for a in own}
    unreachable = []
    for answer in answers:
        if answer.status != 200:
            unreachable.append(answer.address)
            continue
        for alarm in answer.body.get("alarms", []):
            held = by_id.get(alarm["alarm_id"])
            if held is None or _changed_ms(alarm) > _changed_ms(held):
                by_id[alarm["alarm_id"]] = alarm
    alarms = sorted(by_id.values(), key=lambda a: a["last_ms"], reverse=True)
    return {"alarms": alarms, "unreachable": sorted(unreachable)}


def owner_answer(answers: list[PeerAnswer]) -> PeerAnswer:
    """The answer of the replica that holds an alarm (any status but 404 and unreachable), else a
    404 when every peer answered, else a 503 naming the peers that did not."""
    for answer in answers:
        if answer.status not in (0, 404):
            return answer
    down = sorted(a.address for a in answers if a.status == 0)
    if down:
        return PeerAnswer("", 503, {"error": f"no such alarm here and alerters {', '.join(down)} did not answer; "
                                             f"retry when they are back"})
    return PeerAnswer("", 404, {"error": "no such alarm"})
