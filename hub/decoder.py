"""Decoding in a worker process, so that it runs on another core while the hub commits.

The hub is CPU-bound in one Python process: about a third of its time goes to decoding and
validating, the rest to the commit and rule evaluation. A second process decodes the next
messages while the hub commits the previous ones.

Messages go to the worker as (topic, payload) pairs and come back as plain tuples: pickling
pydantic models costs more than validating them again (38 us against 2 us per event), so the
hub rebuilds each event as an :class:`EventHead`. Nothing depends on the worker for safety: the
hub keeps every message until it is committed and acknowledges it only then, so a worker that
dies or hangs costs a moment: its messages, and all later ones, are decoded in-process.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeAlias

from careflow.hub.ingest import (
    Accepted,
    Decoded,
    EventHead,
    PresenceUpdate,
    Rejected,
    decode_message,
)

__all__ = ["DecodeWorker", "decode_safely"]

log = logging.getLogger(__name__)

# The worker answers in milliseconds; this only bounds a hung worker, which is then dropped.
RESULT_TIMEOUT_S = 30.0

_Row: TypeAlias = tuple[str, str, str, str, str, str, int, str, str, Any, int]
_Packed: TypeAlias = tuple[list[_Row], tuple[Rejected, ...], tuple[PresenceUpdate, ...]]


def decode_safely(topic: str, payload: bytes, *, max_bytes: int) -> Decoded:
    """Decode a message; even a bug in decoding becomes a dead letter, never a crash."""
    try:
        return decode_message(topic, payload, max_bytes=max_bytes)
    except Exception as exc:
        log.exception("decoding failed unexpectedly", extra={"topic": topic})
        reason = f"internal error while decoding ({type(exc).__name__}: {exc}); report this bug"
        return Decoded((), (Rejected(topic, "internal_error", reason, payload),))


def _pack(decoded: Decoded) -> _Packed:
    rows = [(a.event.id, a.event.gateway, a.event.device, a.event.type, a.event.time,
             a.event.boot, int(a.event.seq), a.body, a.topic, a.data, a.time_ms)
            for a in decoded.accepted]
    return rows, decoded.rejected, decoded.presence


def _unpack(packed: _Packed) -> Decoded:
    rows, rejected, presence = packed
    accepted = tuple(Accepted(EventHead(r[0], r[1], r[2], r[3], r[4], r[5], r[6]),
                              r[7], r[8], r[9], r[10]) for r in rows)
    return Decoded(accepted, rejected, presence)


def _serve(requests: Connection, results: Connection, max_bytes: int) -> None:
    """The worker: decode each request in order until the hub closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the hub, which stops us
    gc.freeze()  # as service.tune_gc_for_ingest: decoding allocates many short-lived objects
    gc.set_threshold(100_000, 50, 100)
    try:
        while True:
            request: list[tuple[str, bytes]] = requests.recv()
            results.send([_pack(decode_safely(topic, payload, max_bytes=max_bytes))
                          for topic, payload in request])
    except (EOFError, OSError):  # the hub stopped or died: nothing of ours is lost
        return


class DecodeWorker:
    """One decode process; at most one request is outstanding, so the pipe never deadlocks."""

    def __init__(self, *, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._requests: Connection | None = None
        self._results: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._outstanding = 0

    @property
    def alive(self) -> bool:
        """Whether requests still go to the worker (False after any failure)."""
        return self._requests is not None

    def start(self) -> None:
        """Start ``python -m careflow.hub.decoder`` with a pipe each way.

        A plain subprocess rather than multiprocessing: spawn would import the hub's
        ``__main__`` again (``python -m careflow`` runs the CLI on import), and fork would copy
        a process that already runs threads.
        """
        request_r, request_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            self._process = subprocess.Popen(  # noqa: S603 - our interpreter and module
                [sys.executable, "-m", "careflow.hub.decoder", str(request_r), str(result_w),
                 str(self._max_bytes)], pass_fds=(request_r, result_w), stdin=subprocess.DEVNULL)
        except OSError as exc:
            os.close(request_w)
            os.close(result_r)
            log.error("cannot start the decode worker (%s); decoding in-process", exc)
            return
        finally:
            os.close(request_r)  # the worker has its own copies of its ends
            os.close(result_w)
        self._requests = Connection(request_w, readable=False)
        self._results = Connection(result_r, writable=False)

    def submit(self, messages: Sequence[tuple[str, bytes]]) -> bool:
        """Send messages to decode; False (decode them in-process) if the worker is gone."""
        if self._requests is None or self._outstanding:
            return False
        try:
            self._requests.send([(topic, payload) for topic, payload in messages])
        except (OSError, ValueError) as exc:
            self._fail(f"cannot reach the decode worker: {exc}")
            return False
        self._outstanding = len(messages)
        return True

    def result(self) -> list[Decoded] | None:
        """What the worker made of the last submitted messages; None if it failed."""
        if self._results is None or not self._outstanding:
            return None
        expected, self._outstanding = self._outstanding, 0
        try:
            if not self._results.poll(RESULT_TIMEOUT_S):
                self._fail(f"the decode worker did not answer within {RESULT_TIMEOUT_S:.0f}s")
                return None
            packed: list[_Packed] = self._results.recv()
            if len(packed) != expected:
                msg = f"answered {len(packed)} messages of {expected}"
                raise ValueError(msg)  # handled with every other failure below
            return [_unpack(item) for item in packed]
        except Exception as exc:  # whatever it was, the hub still holds the messages
            self._fail(f"the decode worker failed: {exc!r}")
            return None

    def _fail(self, why: str) -> None:
        log.error("%s; decoding in-process from now on, nothing is lost", why)
        if self._process is not None:
            self._process.kill()  # it failed once; it gets no second chance to hang the hub
        self.stop()

    def stop(self) -> None:
        """Close the pipes (the worker exits on it) and reap the process."""
        self._outstanding = 0
        for conn in (self._requests, self._results):
            if conn is not None:
                conn.close()
        self._requests = self._results = None
        process, self._process = self._process, None
        if process is not None:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False),
           Connection(int(sys.argv[2]), readable=False), int(sys.argv[3]))
