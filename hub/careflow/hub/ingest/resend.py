"""Which sequence gaps to ask gateways about, and when: bounded, whatever the gateways send.

Pure: the service passes in the gaps of a commit and ``now``. A gap may only be events still in
flight, so each source is asked at most once per interval; a gateway that shows gaps for many
sources (a bug, or made-up device names) gets a few requests for single sources and then one for
everything it holds, never one per source; and what is remembered to pace the requests is
bounded per gateway and in total.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from careflow.hub.store.records import SourceGap

__all__ = ["ResendRequest", "ResendThrottle"]


class ResendRequest(NamedTuple):
    """Ask ``gateway`` to resend what it has not had confirmed: for one source (device and
    boot), or, with both None, everything."""

    gateway: str
    device: str | None
    boot: str | None


_Key = tuple[str, str | None, str | None]


class ResendThrottle:
    """Paces resend requests: per source once per interval, per gateway at most ``per_gateway``
    single-source requests per interval (then one for everything), at most ``max_tracked``
    sources remembered in all."""

    def __init__(self, *, interval_s: float, per_gateway: int, max_tracked: int) -> None:
        self._interval_s = interval_s
        self._per_gateway = per_gateway
        self._max_tracked = max_tracked
        self._asked: dict[_Key, float] = {}  # in the order asked: the oldest first
        self._windows: dict[str, tuple[float, int]] = {}  # gateway -> (window start, requests)

    def __len__(self) -> int:
        """How many sources (and gateways) are remembered."""
        return len(self._asked) + len(self._windows)

    def due(self, gaps: Iterable[SourceGap], now: float) -> list[ResendRequest]:
        """The requests to send now for these gaps."""
        requests: list[ResendRequest] = []
        for gap in gaps:
            if self._recently_asked((gap.gateway, gap.device, gap.boot), now):
                continue
            start, count = self._windows.get(gap.gateway, (now, 0))
            if now - start >= self._interval_s:
                start, count = now, 0
            if count < self._per_gateway:
                request = ResendRequest(gap.gateway, gap.device, gap.boot)
            elif not self._recently_asked((gap.gateway, None, None), now):
                request = ResendRequest(gap.gateway, None, None)  # everything, once
            else:
                continue
            self._windows.pop(gap.gateway, None)
            self._windows[gap.gateway] = (start, count + 1)
            self._asked[request] = now
            requests.append(request)
        self._forget(now)
        return requests

    def _recently_asked(self, key: _Key, now: float) -> bool:
        asked = self._asked.get(key)
        if asked is None:
            return False
        if now - asked < self._interval_s:
            return True
        del self._asked[key]  # re-inserted when asked again, so the order stays by time
        return False

    def _forget(self, now: float) -> None:
        """Drop what no longer paces anything; past ``max_tracked``, the oldest first."""
        asked, windows = self._asked, self._windows
        while asked and (len(asked) > self._max_tracked or
                         now - asked[next(iter(asked))] >= self._interval_s):
            del asked[next(iter(asked))]
        while windows and (len(windows) > self._max_tracked or
                           now - windows[next(iter(windows))][0] >= self._interval_s):
            del windows[next(iter(windows))]
