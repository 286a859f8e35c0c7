"""Escalation: an unacknowledged critical incident walks its steps; acknowledging stops it."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.routing import Reminder, reminder_due
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.sqlite_store import SqliteStore
from tests.hub.conftest import batch_of

RULES = """
rules:
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
escalation:
  - severity: critical
    steps:
      - after: 1s
        channels: [oncall]
      - after: 2s
        channels: [backup]
"""
CHANNELS = {"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/a",
            "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/b",
            "CAREFLOW_CHANNEL_BACKUP": "json://127.0.0.1:9/c"}


@given(steps=st.lists(st.integers(0, 10_000), max_size=5).map(lambda s: tuple(sorted(s))),
       state=st.sampled_from(["open", "acknowledged", "resolved"]),
       sent=st.integers(0, 6), elapsed=st.integers(0, 20_000))
def test_it_never_escalates_what_is_not_open_and_sends_each_step_once(
    steps: tuple[int, ...], state: str, sent: int, elapsed: int
) -> None:
    due = reminder_due(steps, sent=sent, state=state, triggered_ms=0, now_ms=elapsed,
                       repeat_interval_ms=0)  # the steps alone: no repeats after them
    if state != "open" or sent >= len(steps):
        assert due is None
    elif due is not None:
        assert due is Reminder.ESCALATE and elapsed >= steps[sent]
    else:
        assert elapsed < steps[sent]


def test_it_escalates_only_the_incident_nobody_acknowledged(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    store = SqliteStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), load_channels(CHANNELS))
    alarms = [Stamper(gateway="gw", device=f"fall-{i}") for i in range(2)]
    stored = store.append(batch_of([a.stamp("alert", {"kind": "fall", "state": "raised"})
                                    for a in alarms]))
    t0 = stored.stored[0].received_ms
    stage.handle(stored.stored, now_ms=t0)
    acked, ignored = sorted(store.incidents(), key=lambda i: i.device)
    store.acknowledge_incident(acked.id, by="kari", at_ms=t0 + 500)

    for offset in (900, 1_100, 1_500, 2_100, 5_000):
        stage.tick(t0 + offset)
    sent = [(n.incident_id, n.kind, n.channel) for n in reversed(store.notifications())]
    assert [s for s in sent if s[1] == "firing"] == [(acked.id, "firing", "oncall"),
                                                      (ignored.id, "firing", "oncall")]
    assert [s for s in sent if s[1] == "escalation"] == [(ignored.id, "escalation", "oncall"),
                                                          (ignored.id, "escalation", "backup")]
    assert store.incident(ignored.id).escalation_sent == 2  # type: ignore[union-attr]
    assert "NOT ACKNOWLEDGED" in store.notifications()[0].title
