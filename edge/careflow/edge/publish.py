"""Publishing events at QoS 1 and waiting until the broker has them (PUBACK)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from careflow.core.config import BrokerUrl, TlsFiles
from careflow.core.errors import BrokerError
from careflow.core.mqtt import check, connect_blocking, make_client
from careflow.edge.refusal import pack_batches
from careflow.schemas import batch_topic, event_topic
from careflow.schemas.limits import MAX_BATCH_EVENTS, MAX_MESSAGE_BYTES

__all__ = ["publish_events"]


def publish_events(
    url: BrokerUrl,
    events: Sequence[dict[str, Any]],
    *,
    client_id: str,
    batch: bool = False,
    timeout_s: float = 10.0,
    username: str | None = None,
    password: str | None = None,
    tls: TlsFiles | None = None,
) -> None:
    """Publish events (one message each, or batches within the contract's limits) and wait for
    every PUBACK."""
    client = make_client(client_id=client_id, clean_session=True, url=url, username=username,
                         password=password, tls=tls)
    connect_blocking(client, url, timeout_s=timeout_s)
    try:
        if batch:  # one message per gateway, split where the contract's limits say
            infos = []
            for gateway in sorted({event["gateway"] for event in events}):
                bodies = [json.dumps(e) for e in events if e["gateway"] == gateway]
                for run in pack_batches([len(b.encode("utf-8")) for b in bodies],
                                        max_events=MAX_BATCH_EVENTS, max_bytes=MAX_MESSAGE_BYTES):
                    payload = "[" + ",".join(bodies[run.start:run.stop]) + "]"
                    infos.append(client.publish(batch_topic(gateway), payload, qos=1))
        else:
            infos = [client.publish(event_topic(e["gateway"], e["device"], e["type"]),
                                    json.dumps(e), qos=1) for e in events]
        for info in infos:
            check(info.rc, "publish")
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                msg = f"the broker at {url} did not acknowledge a publish within {timeout_s:g}s"
                raise BrokerError(msg)
    finally:
        client.disconnect()
        client.loop_stop()
