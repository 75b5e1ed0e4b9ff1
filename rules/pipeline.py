"""Alerts on the pipeline itself: Alertmanager's webhook (JSON version 4) turned into the alerter's alarms.

Prometheus evaluates ``deploy/prometheus/alerts.yml``; Alertmanager groups the alerts and POSTs each
group to the alarm API (``POST /pipeline-alerts``, role ``ingest``). Each alert becomes an alarm in
the alerter's own store: rule = its ``alertname``, tenant ``""``, device ``pipeline``, metric = its
other labels (``job=sink,instance=sink:9105``), so it is one alarm per Alertmanager alert identity.
Its events are notified like a device alarm's, through the receivers the rule files' ``pipeline:``
section names (``aimass.rules.model.PipelineRoute``): signed, grouped, rate limited, retried,
dead-lettered, listed by ``GET /alarms`` and acknowledgeable. A firing alert raises its alarm, a
resolved one clears it.

Idempotency: Alertmanager posts a group again whenever it changes and every ``repeat_interval``, and
retries a post whose answer it did not get. A firing alert whose alarm is active changes nothing
(``AlarmStore``'s rule for replays); one that started at or before its alarm last cleared is a late
copy of that incident, and a resolved alert that ended at or before its alarm's current incident
began is a late copy of an older one: both are ignored. So the same alert state posted again never
pages twice, and a late copy never reopens or closes the wrong incident.

Failure handling: a body that is not Alertmanager's version-4 JSON is refused whole with the reason
(``ValueError``, the API's 400); nothing of it is applied.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aimass.rules.alarms import AlarmStore, alarm_id
from aimass.rules.engine import SeriesKey, Signal, notice
from aimass.rules.model import MAX_LABEL_CHARS, MAX_LABELS, MAX_MESSAGE, MAX_NAME_CHARS, SEVERITIES

PIPELINE_TENANT, PIPELINE_DEVICE = "", "pipeline"  # the series of every pipeline alarm: tenant, device_id
MAX_ALERTS = 1000       # alerts in one post (alertmanager.yml's max_alerts keeps a group well under it)
MAX_KEY_CHARS = 200     # a metric key longer than this is cut and made unique with a hash


@dataclass(frozen=True)
class PipelineAlert:
    """One alert of an Alertmanager post."""

    firing: bool
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_ms: int
    ends_ms: int          # when it resolved (meaningful only when not firing)

    @property
    def name(self) -> str:
        return self.labels["alertname"]

    @property
    def severity(self) -> str:
        """Its ``severity`` label when that is one of ours; warning without one; critical for any other."""
        given = self.labels.get("severity")
        return "warning" if given is None else given if given in SEVERITIES else "critical"


def parse_time(text: Any, what: str) -> int:
    """Milliseconds since the epoch of an RFC 3339 time (Alertmanager's, nanoseconds allowed)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be an RFC 3339 time string")
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        raise ValueError(f"{what}: {text[:40]!r} is not an RFC 3339 time") from None


def strings(value: Any, what: str) -> dict[str, str]:
    """A JSON object of strings (labels, annotations)."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{what} must be an object of strings")
    return value


def parse_alert(doc: Any, where: str) -> PipelineAlert:
    """One entry of ``alerts``; ValueError naming the field (``where`` is its position)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be an object")
    status = doc.get("status")
    if status not in ("firing", "resolved"):
        raise ValueError(f"{where}.status must be 'firing' or 'resolved'")
    labels = strings(doc.get("labels"), f"{where}.labels")
    name = labels.get("alertname", "")
    if not name or len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{where}.labels.alertname must be a name of 1 to {MAX_NAME_CHARS} characters")
    firing = status == "firing"
    return PipelineAlert(firing, labels, strings(doc.get("annotations", {}), f"{where}.annotations"),
                         parse_time(doc.get("startsAt"), f"{where}.startsAt"),
                         0 if firing else parse_time(doc.get("endsAt"), f"{where}.endsAt"))


def parse_webhook(body: Any) -> list[PipelineAlert]:
    """The alerts of an Alertmanager webhook body (version 4); ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("body must be Alertmanager's webhook JSON object (version 4)")
    if body.get("version") != "4":
        raise ValueError(f"version must be \"4\" (Alertmanager's webhook format), not {str(body.get('version'))[:20]!r}")
    alerts = body.get("alerts")
    if not isinstance(alerts, list) or not alerts:
        raise ValueError("alerts must be a non-empty list")
    if len(alerts) > MAX_ALERTS:
        raise ValueError(f"{len(alerts)} alerts in one post; at most {MAX_ALERTS} (set max_alerts in alertmanager.yml)")
    return [parse_alert(doc, f"alerts[{i}]") for i, doc in enumerate(alerts)]


def escape(text: str) -> str:
    """``\\``, ``,`` and ``=`` escaped with a backslash, so a key names one label set only."""
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


def metric_key(labels: dict[str, str]) -> str:
    """The alert's identity besides its name: its other labels, sorted, as ``k=v,...`` (bounded)."""
    key = ",".join(f"{escape(k)}={escape(v)}" for k, v in sorted(labels.items()) if k != "alertname")
    if len(key) <= MAX_KEY_CHARS:
        return key
    return key[:MAX_KEY_CHARS - 17] + "~" + hashlib.sha1(key.encode()).hexdigest()[:16]


def series_of(alert: PipelineAlert) -> SeriesKey:
    return PIPELINE_TENANT, PIPELINE_DEVICE, metric_key(alert.labels), 0


def message(alert: PipelineAlert) -> str:
    """The notification text: summary and description annotations (``[resolved]`` first once it is)."""
    a = alert.annotations
    text = " - ".join(t for t in (a.get("summary", ""), a.get("description", "")) if t) or alert.name
    return (text if alert.firing else f"[resolved] {text}")[:MAX_MESSAGE]


def signal(alert: PipelineAlert, store: AlarmStore) -> Signal | None:
    """The alarm signal of one alert, or None for a late copy of an incident already handled."""
    series = series_of(alert)
    alarm = store.alarms.get(alarm_id(alert.name, series))
    if alarm is not None and alert.firing and not alarm.active and alert.starts_ms <= alarm.last_ms:
        return None  # this incident already resolved
    if alarm is not None and not alert.firing and alarm.active and alert.ends_ms <= alarm.first_ms:
        return None  # an older incident's resolution: the current one goes on
    labels = tuple(sorted((k[:MAX_LABEL_CHARS], v[:MAX_LABEL_CHARS]) for k, v in alert.labels.items()))[:MAX_LABELS]
    return notice("fire" if alert.firing else "clear", alert.name, alert.severity, labels, message(alert), series,
                  alert.starts_ms if alert.firing else alert.ends_ms)


def apply_alerts(store: AlarmStore, alerts: list[PipelineAlert], wall_ms: int | None = None) -> list[dict]:
    """Alarm events (rows of contract.ALERTS) for a post's alerts, in order; the store is changed, not saved."""
    events: list[dict] = []
    for alert in alerts:
        if (s := signal(alert, store)) is not None:
            events += store.apply([s], wall_ms)
    return events


def is_pipeline(event: dict) -> bool:
    """Whether an alarm event is of an alert on the pipeline (routed by ``pipeline:``, not by a rule)."""
    return (event["tenant"], event["device_id"]) == (PIPELINE_TENANT, PIPELINE_DEVICE)
