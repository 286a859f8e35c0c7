"""A local input for sensor bridges: a spool directory of JSON-lines files.

A bridge on the gateway writes ``<name>.tmp`` and renames it to ``<name>.jsonl`` when complete
(rename is atomic, so a half-written file is never read), with a name never used before (a
timestamp and a random part). Each line is one reading::

    {"device": "fall-sensor-12", "type": "alert", "data": {"kind": "fall", "state": "raised"}}

with an optional ``"time"`` (RFC 3339; default: when the agent reads it). The agent stamps and
queues each line exactly once: how far it got in a file is saved in the same transaction as the
event, so a crash mid-file neither loses nor repeats a line. Finished files are deleted; lines
that are not valid are logged, counted and skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from careflow.edge.outbox import Outbox
from careflow.errors import ContractError
from careflow.schemas import EVENT_TYPES, parse_rfc3339

__all__ = ["SpoolInput", "SpoolReport"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SpoolReport:
    """What one scan did."""

    queued: int = 0
    alerts: int = 0
    invalid: int = 0


class SpoolInput:
    """Reads ``*.jsonl`` files from a directory into the outbox."""

    def __init__(self, directory: Path, outbox: Outbox) -> None:
        self.directory = directory
        self.outbox = outbox
        directory.mkdir(parents=True, exist_ok=True)
        for name in outbox.marks("spool:"):  # files finished just before a crash
            if not (directory / name.removeprefix("spool:")).exists():
                outbox.clear_mark(name)

    def scan(self, on_alert: Callable[[], None] | None = None) -> SpoolReport:
        """Queue every new line of every complete file, oldest file first."""
        report = SpoolReport()
        for path in sorted(self.directory.glob("*.jsonl")):
            self._read_file(path, report, on_alert)
        return report

    def _read_file(self, path: Path, report: SpoolReport,
                   on_alert: Callable[[], None] | None) -> None:
        mark_name = f"spool:{path.name}"
        done = int(self.outbox.mark(mark_name) or 0)
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if number <= done or not line.strip():
                    continue
                try:
                    device, event_type, data, at_ms = _reading(line)
                    self.outbox.add(device, event_type, data, at_ms=at_ms,
                                    mark=(mark_name, str(number)))
                except (ValueError, ContractError) as exc:
                    report.invalid += 1
                    log.warning("skipped an invalid spool line",
                                extra={"file": path.name, "line": number, "reason": str(exc)})
                    continue
                report.queued += 1
                if event_type == "alert":
                    report.alerts += 1
                    if on_alert is not None:
                        on_alert()
        path.unlink()
        self.outbox.clear_mark(mark_name)


def _reading(line: str) -> tuple[str, str, dict[str, Any], int | None]:
    value = json.loads(line)
    if not isinstance(value, dict):
        msg = "a spool line must be a JSON object"
        raise ValueError(msg)
    device, event_type, data = value.get("device"), value.get("type"), value.get("data", {})
    if not isinstance(device, str) or event_type not in EVENT_TYPES or not isinstance(data, dict):
        msg = (f"needs a device (string), a type ({', '.join(EVENT_TYPES)}) and a data object; "
               f"got device={device!r} type={event_type!r}")
        raise ValueError(msg)
    at = value.get("time")
    at_ms = int(parse_rfc3339(at).timestamp() * 1000) if isinstance(at, str) else None
    return device, str(event_type), data, at_ms
