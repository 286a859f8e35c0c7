"""Stamping events at the origin: id, boot and seq are assigned once and kept through retries."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

import uuid6

from careflow.schemas import CONTRACT_VERSION, format_rfc3339

__all__ = ["Stamper", "new_boot_id", "new_event_id"]


def new_event_id() -> str:
    """A UUIDv7: unique, and time-ordered so the hub's indexes stay append-friendly."""
    return str(uuid6.uuid7())


def new_boot_id() -> str:
    """A fresh boot identifier: UTC start time plus randomness, readable in logs."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class Stamper:
    """Gives each event of one source its envelope: id, the source's boot, and the next seq."""

    def __init__(self, *, gateway: str, device: str | None = None, boot: str | None = None,
                 next_seq: int = 1) -> None:
        self.gateway = gateway
        self.device = device or gateway
        self.boot = boot or new_boot_id()
        self.next_seq = next_seq

    def stamp(self, event_type: str, data: dict[str, Any], *,
              at: datetime | None = None) -> dict[str, Any]:
        """A complete contract-v1 event, ready to publish."""
        envelope = {
            "v": CONTRACT_VERSION,
            "id": new_event_id(),
            "type": event_type,
            "gateway": self.gateway,
            "device": self.device,
            "time": format_rfc3339(at or datetime.now(UTC)),
            "boot": self.boot,
            "seq": self.next_seq,
            "data": data,
        }
        self.next_seq += 1
        return envelope
