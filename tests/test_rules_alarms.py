"""Alarm lifecycle and acknowledgement, state surviving a restart, (the HTTP API: tests/test_rules_api.py)."""
from __future__ import annotations

from dataclasses import asdict

from aimass.rules.alarms import AlarmStore, StateDB
from aimass.rules.cli import alarm_text
from aimass.rules.engine import Engine
from tests.fixtures_rules import ruleset, windows

RULE = ("rules:\n  - {name: hot, stream: windows, condition: mean > 80, clear: mean < 75, severity: critical,\n"
        "     flapping: {changes: 10, within: 1m}}\n")


def fire_and_clear(engine: Engine, store: AlarmStore, means: list[float], start_s: int = 10) -> list[dict]:
    rows = [dict(window_end_ms=(start_s + 10 * i) * 1000, mean=m) for i, m in enumerate(means)]
    return store.apply(engine.process("windows", windows(*rows)))


def test_lifecycle_with_acknowledgements(tmp_path):
    engine = Engine(ruleset(tmp_path, RULE))
    store = AlarmStore(StateDB(tmp_path / "s.sqlite"))
    [raised] = fire_and_clear(engine, store, [90])
    aid = raised["alarm_id"]
    assert store.alarms[aid].state == "active_unack"
    assert store.acknowledge(aid, "alice")["state"] == "active_ack"
    assert store.acknowledge(aid, "bob") is None                        # nothing left to acknowledge
    [cleared] = fire_and_clear(engine, store, [70], start_s=20)
    assert cleared["state"] == "cleared"                                # acked, then cleared: done
    assert store.listing() == []
    [reraised] = fire_and_clear(engine, store, [95], start_s=30)
    assert (reraised["transition"], reraised["state"], reraised["count"]) == ("reraised", "active_unack", 2)
    assert store.alarms[aid].acked_by == ""
    [cleared] = fire_and_clear(engine, store, [60], start_s=40)
    assert cleared["state"] == "cleared_unack"                          # cleared before anyone looked
    assert [a.alarm_id for a in store.listing()] == [aid]
    event = store.acknowledge(aid, "carol")
    assert (event["transition"], event["state"]) == ("acknowledged", "cleared")
    assert store.acknowledge("nope", "x") is None


def test_an_alarm_keeps_the_message_that_raised_it(tmp_path):
    engine = Engine(ruleset(tmp_path, RULE.replace("severity: critical", "severity: critical, message: 'mean {value:.0f}'")))
    store = AlarmStore(StateDB(tmp_path / "s.sqlite"))
    [raised] = fire_and_clear(engine, store, [90])
    [cleared] = fire_and_clear(engine, store, [70], start_s=20)
    alarm = store.alarms[raised["alarm_id"]]
    assert (raised["message"], cleared["message"]) == ("mean 90", "mean 70")
    assert (alarm.message, alarm.raised_message) == ("mean 70", "mean 90")
    assert alarm_text(asdict(alarm)) == "mean 70 (raised: mean 90)"
    fire_and_clear(engine, store, [95], start_s=30)
    assert (alarm.message, alarm.raised_message) == ("mean 95", "mean 95")
    assert alarm_text(asdict(alarm)) == "mean 95"


def test_state_survives_a_restart(tmp_path):
    engine = Engine(ruleset(tmp_path, RULE))
    db = StateDB(tmp_path / "s.sqlite")
    store = AlarmStore(db)
    [raised] = fire_and_clear(engine, store, [90])
    store.acknowledge(raised["alarm_id"], "alice")
    with db:
        store.save()
        db.put("engine", "{}")
    db.close()

    db2 = StateDB(tmp_path / "s.sqlite")
    store2 = AlarmStore(db2)
    alarm = store2.alarms[raised["alarm_id"]]
    assert (alarm.state, alarm.acked_by, alarm.count, alarm.severity) == ("active_ack", "alice", 1, "critical")
    # a replay of the same firing after the restart does not raise it again
    assert fire_and_clear(Engine(ruleset(tmp_path, RULE)), store2, [90]) == []
    assert db2.get("engine") == "{}"


def test_unsaved_changes_are_not_persisted(tmp_path):
    db = StateDB(tmp_path / "s.sqlite")
    store = AlarmStore(db)
    fire_and_clear(Engine(ruleset(tmp_path, RULE)), store, [90])
    try:
        with db:
            store.save()
            db.queue("topic", [{"a": 1}])
            raise RuntimeError("crash inside the transaction")
    except RuntimeError:
        pass
    db.close()
    db2 = StateDB(tmp_path / "s.sqlite")
    assert AlarmStore(db2).alarms == {} and db2.queued() == []
