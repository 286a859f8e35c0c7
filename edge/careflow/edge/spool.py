"""A local input for sensor bridges: a spool directory of JSON-lines files.

A bridge on the gateway writes ``<name>.tmp`` and renames it to ``<name>.jsonl`` when complete
(rename is atomic, so a half-written file is never read), with a name never used before (a
timestamp and a random part). Each line is one reading::

    {"device": "fall-sensor-12", "type": "alert", "data": {"kind": "fall", "state": "raised"}}

with an optional ``"time"`` (RFC 3339; default: when the agent reads it). The agent stamps and
queues each line exactly once: how far it got in a file is saved in the same transaction as the
event, so a crash mid-file neither loses nor repeats a line. Finished files are deleted. One
scan reads at most SCAN_LINES lines (or SCAN_BYTES), so a backlog never holds up sending.

Nothing in the spool can stop the agent. A line the contract refuses (not JSON, a wrong field,
over MAX_EVENT_BYTES, nested deeper than MAX_DATA_DEPTH) is replaced by an ``error`` event
(``E_EVENT_REFUSED``, see :mod:`careflow.edge.refusal`) carrying its first characters and the
reason, in the same transaction as the progress mark; a refused care alarm is reported
``critical``. An entry that cannot be read at all (a directory, a symbolic link, which is never
followed, a FIFO, a read error) is reported (``E_SPOOL_UNREADABLE``), moved to ``quarantine/``
(or, if it cannot be moved, skipped until the agent restarts), and the next file is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from careflow.core.errors import ContractError, StoreError
from careflow.edge.outbox import Outbox
from careflow.edge.refusal import E_EVENT_REFUSED, refusal_report, sniff_type, unreadable_report
from careflow.schemas import EVENT_TYPES, decode_json, parse_rfc3339
from careflow.schemas.limits import MAX_EVENT_BYTES

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_SKIP_BYTES",
    "QUARANTINE",
    "REPORTS_PER_FILE",
    "SCAN_BYTES",
    "SCAN_LINES",
    "SpoolInput",
    "SpoolReport",
]

log = logging.getLogger(__name__)

# A line longer than this is refused unread (``oversized``): no stamped event could be under
# MAX_EVENT_BYTES, bar whitespace and escapes, and the agent never holds more of it in memory.
MAX_LINE_BYTES = 4 * MAX_EVENT_BYTES
# A line longer than this ends the reading of its file, which is set aside: skipping through it
# would hold the agent for as long as reading it takes (a sparse file is free to make).
MAX_SKIP_BYTES = 16 * 1024 * 1024
# Where unreadable entries are moved (inside the spool directory, never matched by ``*.jsonl``).
QUARANTINE = "quarantine"
# Refused lines reported one by one per file; past this only a count follows. Care alarms are
# always reported one by one.
REPORTS_PER_FILE = 20
# The most one scan reads (lines, bytes), so a huge file never holds up sending: the agent's
# heartbeat and care alarms go out between scans.
SCAN_LINES = 1_000
SCAN_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class SpoolReport:
    """What one scan did."""

    queued: int = 0
    alerts: int = 0
    invalid: int = 0
    quarantined: int = 0
    more: bool = False  # stopped at the scan's bound: more lines wait


@dataclass(slots=True)
class _Budget:
    """What one scan may still read."""

    lines: int
    bytes: int

    @property
    def spent(self) -> bool:
        return self.lines <= 0 or self.bytes <= 0

    def take(self, size: int) -> None:
        self.lines -= 1
        self.bytes -= size


@dataclass(frozen=True, slots=True)
class _Progress:
    """How far the agent got in a spool file, saved as its mark with each event it queued.

    ``line``: the last line done; ``offset``: the byte after it (None in a mark of an older
    agent, which counted lines only); ``reported`` and ``suppressed``: refused lines reported
    one by one, and those only counted, so the bound holds across scans and restarts;
    ``file_id``: the file's inode, so a new file renamed over a half-read one of the same name
    is read from its start.
    """

    line: int = 0
    offset: int | None = None
    reported: int = 0
    suppressed: int = 0
    file_id: int | None = None

    @classmethod
    def parse(cls, value: str | None) -> _Progress:
        parts = [int(part) for part in (value or "0").split()]
        if len(parts) == 1:
            return cls(line=parts[0])
        return cls(*parts[:5])

    def value(self) -> str:
        if self.offset is None:
            return str(self.line)
        tail = "" if self.file_id is None else f" {self.file_id}"
        return f"{self.line} {self.offset} {self.reported} {self.suppressed}{tail}"


class _UnreadableError(Exception):
    """A spool entry that is not a regular file the agent can read."""


class SpoolInput:
    """Reads ``*.jsonl`` files from a directory into the outbox."""

    def __init__(self, directory: Path, outbox: Outbox) -> None:
        self.directory = directory
        self.outbox = outbox
        self._skipped: set[str] = set()  # unreadable and could not be moved: not again
        directory.mkdir(parents=True, exist_ok=True)
        for name in outbox.marks("spool"):  # files finished just before a crash
            if not os.path.lexists(directory / _entry_name(name)):
                outbox.clear_mark(name)

    @property
    def quarantine(self) -> Path:
        """Where entries the agent cannot read are moved."""
        return self.directory / QUARANTINE

    def scan(self, on_alert: Callable[[], None] | None = None, *,
             max_lines: int = SCAN_LINES) -> SpoolReport:
        """Queue new lines of complete files, oldest file first, at most ``max_lines`` of them
        (each entry visited counts as one too).

        The bound keeps one round of the agent short whatever a bridge wrote (a backlog of a
        million lines): the agent sends what is due, its heartbeat included, between scans, and
        the next scan goes on where this one stopped (``report.more``).
        """
        report = SpoolReport()
        budget = _Budget(lines=max_lines, bytes=SCAN_BYTES)
        try:
            paths = sorted(self.directory.glob("*.jsonl"))
        except OSError as exc:
            log.error("cannot list the spool directory", extra={"spool": str(self.directory),
                                                                "reason": str(exc)})
            return report
        for path in paths:
            if path.name in self._skipped:
                continue
            if budget.spent:
                report.more = True
                break
            budget.take(0)  # an entry costs as a line does: a million empty files are free
            outcome = self._take(path, report, on_alert, budget)
            if outcome == "unfinished":
                report.more = True
                break
            if outcome == "finished":
                self._finish(path)
        return report

    def _take(self, path: Path, report: SpoolReport, on_alert: Callable[[], None] | None,
              budget: _Budget) -> str:
        """Read one file within the budget: ``finished``, ``unfinished`` or ``set-aside``."""
        try:
            return ("finished" if self._read_file(path, report, on_alert, budget)
                    else "unfinished")
        except FileNotFoundError:  # gone meanwhile (a bridge took it back): nothing to read
            if os.path.lexists(path):
                self._set_aside(path, "a symbolic link to nothing", report)
            else:
                self.outbox.clear_mark(_mark_name(path.name))
        except (OSError, _UnreadableError) as exc:
            self._set_aside(path, str(exc) or type(exc).__name__, report)
        except StoreError:
            raise  # the outbox cannot be written: no file is to blame
        except Exception as exc:  # a bug: never let one file stop every later one
            log.exception("reading a spool file failed unexpectedly",
                          extra={"file": _shown(path.name)})
            self._set_aside(path, f"{type(exc).__name__}: {exc}", report)
        return "set-aside"

    def _finish(self, path: Path) -> None:
        """Delete a file read to the end (every line marked), then forget its mark."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # read to the end, every line marked: only skip it now
            log.error("cannot delete a finished spool file; skipping it",
                      extra={"file": path.name, "reason": str(exc)})
            self._skipped.add(path.name)
            return
        self.outbox.clear_mark(_mark_name(path.name))

    # -- one file ---------------------------------------------------------------------------

    def _read_file(self, path: Path, report: SpoolReport,
                   on_alert: Callable[[], None] | None, budget: _Budget) -> bool:
        """Queue (or refuse and report) lines not yet marked done, within the budget; whether
        the file is finished. OSError if unreadable."""
        mark_name = _mark_name(path.name)
        at = _Progress.parse(self.outbox.mark(mark_name))
        shown = _shown(path.name)
        with _open_regular(path) as stream:
            at = _resume(stream, at, shown)
            lines = _bounded_lines(stream, MAX_LINE_BYTES, at.offset or 0)
            for number, (raw, size, end) in enumerate(lines, start=1 if at.offset is None
                                                      else at.line + 1):
                if number <= at.line:  # a mark of an older agent: a line count, no offset
                    continue
                if budget.spent:
                    self.outbox.set_mark(mark_name, at.value())
                    return False
                budget.take(size)
                at = dataclasses.replace(at, line=number, offset=end)
                if not raw.strip():
                    continue
                text = raw.decode("utf-8", errors="replace")
                value: object = None
                try:
                    if size > MAX_LINE_BYTES:
                        raise ContractError("oversized", f"the line is {size} bytes, over the "
                                                         f"spool's {MAX_LINE_BYTES}")
                    value = _decode(text)
                    device, event_type, data, at_ms = _reading(value)
                    self.outbox.add(device, event_type, data, at_ms=at_ms,
                                    mark=(mark_name, at.value()))
                except ContractError as exc:
                    report.invalid += 1
                    refused_type = sniff_type(value, text)
                    log.warning("refused a spool line", extra={
                        "file": shown, "line": number, "code": exc.code, "reason": str(exc),
                        "type": refused_type})
                    if refused_type == "alert" or at.reported < REPORTS_PER_FILE:
                        at = dataclasses.replace(at, reported=at.reported + 1)
                        self._report(refusal_report(
                            text=text, size=size, reason=exc,
                            source=f"spool {shown} line {number}", refused_type=refused_type,
                            refused_device=value.get("device") if isinstance(value, dict)
                            else None), mark=(mark_name, at.value()))
                    else:
                        at = dataclasses.replace(at, suppressed=at.suppressed + 1)
                    if refused_type == "alert" and on_alert is not None:
                        on_alert()  # the report of a refused alarm goes out at once too
                    continue
                report.queued += 1
                if event_type == "alert":
                    report.alerts += 1
                    if on_alert is not None:
                        on_alert()
        self._report_suppressed(mark_name, shown, at)
        return True

    def _report_suppressed(self, mark_name: str, shown: str, at: _Progress) -> None:
        """At the end of a file, the count of refused lines not reported one by one."""
        if not at.suppressed:
            return
        self._report({
            "code": E_EVENT_REFUSED, "severity": "error", "component": "edge-spool",
            "message": f"the gateway refused {at.suppressed} more lines of spool {shown} "
                       f"than it reported one by one (the first {REPORTS_PER_FILE} were)",
            "source": f"spool {shown}", "more_refused": at.suppressed,
        }, mark=(mark_name, dataclasses.replace(at, suppressed=0).value()))

    def _report(self, data: dict[str, Any], *, mark: tuple[str, str] | None) -> None:
        """Queue an error event of the gateway itself."""
        self.outbox.add(self.outbox.gateway, "error", data, mark=mark)

    # -- entries that cannot be read ---------------------------------------------------------

    def _set_aside(self, path: Path, reason: str, report: SpoolReport) -> None:
        """Report an unreadable entry, then move it to quarantine (or skip it from now on)."""
        mark_name = _mark_name(path.name)
        lines_read = _Progress.parse(self.outbox.mark(mark_name)).line
        target = self._quarantine_target(path.name)
        shown = f"{QUARANTINE}/{target.name}"
        log.error("cannot read a spool entry; setting it aside",
                  extra={"file": path.name, "reason": reason, "to": shown})
        try:
            may_hold_readings = not stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            may_hold_readings = True
        self._report(unreadable_report(name=path.name, reason=reason, lines_read=lines_read,
                                       quarantined_to=shown, may_hold_readings=may_hold_readings),
                     mark=None)
        report.quarantined += 1
        try:
            self.quarantine.mkdir(exist_ok=True)
            path.rename(target)
        except OSError as exc:
            log.error("cannot move an unreadable spool entry aside; skipping it",
                      extra={"file": path.name, "reason": str(exc)})
            self._skipped.add(path.name)
            return
        self.outbox.clear_mark(mark_name)

    def _quarantine_target(self, name: str) -> Path:
        target = self.quarantine / name
        counter = 1
        while os.path.lexists(target):
            target = self.quarantine / f"{name}.{counter}"
            counter += 1
        return target


_MARK = "spool:"
_BYTES_MARK = "spool-bytes:"  # then the hex of the name's bytes


def _mark_name(name: str) -> str:
    """The outbox mark of a spool file's progress.

    A name that is not UTF-8 (a bridge on a latin-1 system) reaches Python with lone surrogates,
    which SQLite cannot store: such a name is kept as the hex of its bytes.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return _BYTES_MARK + os.fsencode(name).hex()
    return _MARK + name


def _entry_name(mark: str) -> str:
    """The spool file a mark belongs to (the inverse of :func:`_mark_name`)."""
    if mark.startswith(_BYTES_MARK):
        return os.fsdecode(bytes.fromhex(mark.removeprefix(_BYTES_MARK)))
    return mark.removeprefix(_MARK)


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[IO[bytes]]:
    """Open a spool entry for reading only if it is a regular file.

    Non-blocking, so a FIFO (which would block ``open`` until a writer comes) is seen and refused
    rather than hanging the agent; a directory opens on Linux, and is refused by its type. A
    symbolic link is never followed: it could point out of the spool (at a file only the agent
    may read, whose first lines refusal reports would carry to the hub, or at a device).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            msg = "a symbolic link, not a file of readings (links are never followed)"
            raise _UnreadableError(msg) from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device or special file")
            msg = f"{kind}, not a file of readings"
            raise _UnreadableError(msg)
        stream = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with stream:
        yield stream


def _bounded_lines(stream: IO[bytes], limit: int,
                   start: int = 0) -> Iterator[tuple[bytes, int, int]]:
    """Each line without its newline, cut after ``limit`` + 1 bytes, with its full size and the
    offset just after it (the stream is read from ``start``).

    A longer line is skipped through in chunks, so its size costs no memory, and only up to
    MAX_SKIP_BYTES, so its length costs no more than that in time (``_UnreadableError``).
    """
    offset = start
    while True:
        chunk = stream.readline(limit + 1)
        if not chunk:
            return
        offset += len(chunk)
        if chunk.endswith(b"\n"):
            yield chunk[:-1], len(chunk) - 1, offset
            continue
        if len(chunk) <= limit:  # the last line, without a newline
            yield chunk, len(chunk), offset
            return
        size = len(chunk)
        while rest := stream.readline(65536):
            offset += len(rest)
            if rest.endswith(b"\n"):
                size += len(rest) - 1
                break
            size += len(rest)
            if size > MAX_SKIP_BYTES:  # a sparse terabyte is one free line of zeros
                msg = (f"a line over {MAX_SKIP_BYTES // (1024 * 1024)} MiB at byte "
                       f"{offset - size}: not a file of readings")
                raise _UnreadableError(msg)
        yield chunk, size, offset


def _resume(stream: IO[bytes], at: _Progress, shown: str) -> _Progress:
    """Seek to where the mark says, if it was saved for this very file (else start over)."""
    file_id = os.fstat(stream.fileno()).st_ino
    if at.file_id not in (None, file_id):  # a new file renamed over the half-read one
        log.warning("a spool file was replaced while half read; reading the new one from its "
                    "start", extra={"file": shown, "lines_read": at.line})
        at = _Progress()
    if at.offset is not None:
        stream.seek(at.offset)
    return dataclasses.replace(at, file_id=file_id)


def _shown(name: str) -> str:
    """A file name fit for a report: a name that is not UTF-8 gets U+FFFD where it is not."""
    return os.fsencode(name).decode("utf-8", errors="replace")


def _decode(text: str) -> object:
    """A line as JSON, as strictly as the hub reads an event: no NaN or Infinity, no deeper
    than an event may nest (the line is an event's shape: an object around ``data``)."""
    return decode_json(text.encode("utf-8"))


def _reading(value: object) -> tuple[str, str, dict[str, Any], int | None]:
    if not isinstance(value, dict):
        msg = f"a spool line must be a JSON object, not {type(value).__name__}"
        raise ContractError("schema", msg)
    device, event_type, data = value.get("device"), value.get("type"), value.get("data", {})
    if not isinstance(device, str) or event_type not in EVENT_TYPES or not isinstance(data, dict):
        msg = (f"needs a device (string), a type ({', '.join(EVENT_TYPES)}) and a data object; "
               f"got device={str(device)[:80]!r} type={str(event_type)[:32]!r}")
        raise ContractError("schema", msg)
    at = value.get("time")
    try:
        at_ms = int(parse_rfc3339(at).timestamp() * 1000) if isinstance(at, str) else None
    except (ValueError, OverflowError) as exc:
        raise ContractError("schema", f"time: {str(at)[:64]!r} is not an RFC 3339 time") from exc
    return device, str(event_type), data, at_ms
