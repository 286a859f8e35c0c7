"""Decoding in a worker process, so that it runs on another core while the hub commits.

The hub is CPU-bound in one Python process: with batches, about a third of its time goes to
decoding and validating, the rest to the commit and rule evaluation. A second process decodes
the next batches while the hub commits the previous ones (single-event messages cost less to
decode in the hub than to hand over; the service decides which groups come here).

Messages go to the worker as (topic, payload) pairs and come back as plain tuples, from which
the hub rebuilds each event's :class:`EventHead` (pickling richer objects cost more than the
validation they saved). Nothing depends on the worker for safety: the
hub keeps every message until it is committed and acknowledges it only then, so a worker that
dies or hangs costs a moment: its messages are decoded in-process (a message that broke the
worker ends there as accepted or as a dead letter, never sent to a worker again), and a new
worker takes over after RESTART_DELAY_S, longer while replacements keep failing.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, TypeAlias

from careflow.hub.ingest.decode import (
    Accepted,
    Decoded,
    EventHead,
    PresenceUpdate,
    Rejected,
    decode_message,
)

__all__ = ["DecodeWorker", "decode_safely", "internal_error"]

log = logging.getLogger(__name__)

# The worker answers in milliseconds. These bound a hung or stopped worker, which is then
# dropped: the writer thread (and with it acks and the alert clock) never waits longer than
# this plus the time decoding the request's bytes can honestly take.
RESULT_TIMEOUT_S = 2.0
SEND_TIMEOUT_S = 2.0
DECODE_BYTES_PER_S = 2_000_000  # far below the worker's real rate (tens of MB/s)
PIPE_BYTES = 1 << 20
# A failed worker is replaced after this long, doubling while replacements keep failing (a
# message that breaks the worker is decoded in-process meanwhile, and only once).
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
_HEADER = struct.Struct("!Q")  # each pickle travels with its length


def _write_frame(fd: int, data: bytes, deadline: float | None) -> None:
    """Write one length-prefixed frame; with a deadline, never block past it."""
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                raise TimeoutError("the decode worker does not take requests")
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    while size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("the decode worker did not answer in time")
        try:
            chunk = os.read(fd, min(size, 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            raise EOFError("the decode worker closed its pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None) -> bytes:
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return _read_exact(fd, size, deadline)

def _widen_pipe(fd: int) -> None:
    """Let a whole request (a commit's worth of payload) fit in the pipe, so handing it over
    never waits for the worker to read: 1 MiB instead of Linux's 64 KiB, where allowed."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    with contextlib.suppress(OSError):  # over the system's limit: the default still works
        fcntl.fcntl(fd, set_size, PIPE_BYTES)


_Row: TypeAlias = tuple[str, str, str, str, str, str, int, str, str, Any, int]
_Packed: TypeAlias = tuple[list[_Row], tuple[Rejected, ...], tuple[PresenceUpdate, ...]]


def internal_error(topic: str, payload: bytes, exc: BaseException, *, where: str) -> Rejected:
    """The dead letter of a message that made careflow itself fail: kept with the reason."""
    return Rejected(topic, "internal_error", f"internal error while {where} "
                    f"({type(exc).__name__}: {str(exc)[:500]}); report this bug", payload)


def decode_safely(topic: str, payload: bytes, *, max_bytes: int) -> Decoded:
    """Decode a message; even a bug in decoding becomes a dead letter, never a crash."""
    try:
        return decode_message(topic, payload, max_bytes=max_bytes)
    except Exception as exc:
        log.exception("decoding failed unexpectedly", extra={"topic": topic})
        return Decoded((), (internal_error(topic, payload, exc, where="decoding"),))


def _pack(decoded: Decoded) -> _Packed:
    # *a.event: the seven envelope fields in EventHead's order, without seven attribute lookups
    rows = [(*a.event, a.body, a.topic, a.data, a.time_ms) for a in decoded.accepted]
    return rows, decoded.rejected, decoded.presence


def _unpack(packed: _Packed) -> Decoded:
    rows, rejected, presence = packed
    accepted = tuple([Accepted(EventHead(r[0], r[1], r[2], r[3], r[4], r[5], r[6]),
                               r[7], r[8], r[9], r[10]) for r in rows])
    return Decoded(accepted, rejected, presence)


def _answer(request: list[tuple[str, bytes]], max_bytes: int) -> bytes:
    """The pickled decodings of a request. A decoding that cannot be pickled (nothing the
    contract accepts should be one) becomes that message's dead letter, not a dead worker."""
    answer = [_pack(decode_safely(topic, payload, max_bytes=max_bytes))
              for topic, payload in request]
    try:
        return pickle.dumps(answer, pickle.HIGHEST_PROTOCOL)
    except Exception:  # find the message at fault and refuse it alone
        portable: list[_Packed] = []
        for (topic, payload), packed in zip(request, answer, strict=True):
            try:
                pickle.dumps(packed, pickle.HIGHEST_PROTOCOL)
                portable.append(packed)
            except Exception as exc:  # whatever it is, it is this message's alone
                portable.append(([], (internal_error(
                    topic, payload, exc, where="handing over its decoding"),), ()))
        return pickle.dumps(portable, pickle.HIGHEST_PROTOCOL)


def _serve(requests: int, results: int, max_bytes: int) -> None:
    """The worker: decode each request in order until the hub closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the hub, which stops us
    gc.freeze()  # as service.tune_gc_for_ingest: decoding allocates many short-lived objects
    gc.set_threshold(100_000, 50, 100)
    try:
        while True:
            # a private pipe between the hub and its own child: no one else writes to it
            request: list[tuple[str, bytes]] = pickle.loads(  # noqa: S301
                _read_frame(requests, None))
            _write_frame(results, _answer(request, max_bytes), None)
    except (EOFError, OSError):  # the hub stopped or died: nothing of ours is lost
        return


class DecodeWorker:
    """One decode process; at most one request is outstanding, so the pipe never deadlocks."""

    def __init__(self, *, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._requests: int | None = None  # our pipe ends, non-blocking
        self._results: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._outstanding = 0
        self._deadline = 0.0  # when the outstanding request's answer is overdue
        self._restart_at: float | None = None  # after a failure: when to start a new worker
        self._restart_delay = RESTART_DELAY_S
        self.restarts = 0

    @property
    def alive(self) -> bool:
        """Whether requests go to the worker now (False from a failure until its replacement)."""
        return self._requests is not None

    def start(self) -> None:
        """Start ``python -m careflow.hub.ingest.decode_worker`` with a pipe each way.

        A plain subprocess rather than multiprocessing: spawn would import the hub's
        ``__main__`` again (``python -m careflow.cli`` runs the CLI on import), and fork would copy
        a process that already runs threads.
        """
        request_r, request_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            self._process = subprocess.Popen(  # noqa: S603 - our interpreter and module
                [sys.executable, "-m", "careflow.hub.ingest.decode_worker", str(request_r), str(result_w),
                 str(self._max_bytes)], pass_fds=(request_r, result_w), stdin=subprocess.DEVNULL)
        except OSError as exc:
            os.close(request_w)
            os.close(result_r)
            log.error("cannot start the decode worker (%s); decoding in-process", exc)
            self._restart_at = time.monotonic() + self._restart_delay
            self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY_S)
            return
        finally:
            os.close(request_r)  # the worker has its own copies of its ends
            os.close(result_w)
        os.set_blocking(request_w, False)
        os.set_blocking(result_r, False)
        for fd in (request_w, result_r):
            _widen_pipe(fd)
        self._requests, self._results = request_w, result_r

    def submit(self, messages: Sequence[tuple[str, bytes]]) -> bool:
        """Send messages to decode; False (decode them in-process) if the worker is gone or
        does not take them within SEND_TIMEOUT_S."""
        if self._requests is None and self._restart_at is not None \
                and time.monotonic() >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            log.warning("restarting the decode worker", extra={"restarts": self.restarts})
            self.start()
        if self._requests is None or self._outstanding:
            return False
        request = [(topic, payload) for topic, payload in messages]
        try:
            _write_frame(self._requests, pickle.dumps(request, pickle.HIGHEST_PROTOCOL),
                         time.monotonic() + SEND_TIMEOUT_S)
        except (OSError, ValueError, TimeoutError) as exc:
            self._fail(f"cannot hand messages to the decode worker: {exc}")
            return False
        self._outstanding = len(messages)
        size = sum(len(payload) for _, payload in request)
        self._deadline = time.monotonic() + RESULT_TIMEOUT_S + size / DECODE_BYTES_PER_S
        return True

    def result(self) -> list[Decoded] | None:
        """What the worker made of the last submitted messages; None if it failed or is late."""
        if self._results is None or not self._outstanding:
            return None
        expected, self._outstanding = self._outstanding, 0
        try:
            packed: list[_Packed] = pickle.loads(  # noqa: S301 - our own child's pipe
                _read_frame(self._results, self._deadline))
            if len(packed) != expected:
                msg = f"answered {len(packed)} messages of {expected}"
                raise ValueError(msg)  # handled with every other failure below
            decoded = [_unpack(item) for item in packed]
        except Exception as exc:  # whatever it was, the hub still holds the messages
            self._fail(f"the decode worker failed: {exc!r}")
            return None
        self._restart_delay = RESTART_DELAY_S  # it works: a later failure is replaced quickly
        return decoded

    def _fail(self, why: str) -> None:
        log.error("%s; decoding in-process meanwhile, nothing is lost", why,
                  extra={"restart_in_s": self._restart_delay})
        if self._process is not None:
            self._process.kill()  # this one gets no second chance to hang the hub
        self.stop()
        self._restart_at = time.monotonic() + self._restart_delay
        self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY_S)

    def stop(self) -> None:
        """Close the pipes (the worker exits on it) and reap the process; no restart follows."""
        self._outstanding = 0
        self._restart_at = None
        for fd in (self._requests, self._results):
            if fd is not None:
                os.close(fd)
        self._requests = self._results = None
        process, self._process = self._process, None
        if process is not None:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
