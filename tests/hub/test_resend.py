"""Pacing of resend requests: per source, per gateway and in total, whatever gateways send."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.ingest.resend import ResendRequest, ResendThrottle
from careflow.hub.store.records import SourceGap


def gaps(gateway: str, devices: int, boot: str = "b") -> list[SourceGap]:
    return [SourceGap(gateway, f"d{i}", boot, 1) for i in range(devices)]


def throttle(per_gateway: int = 3, max_tracked: int = 1000) -> ResendThrottle:
    return ResendThrottle(interval_s=10.0, per_gateway=per_gateway, max_tracked=max_tracked)


def test_it_asks_each_source_once_per_interval() -> None:
    pacer = throttle()
    assert pacer.due(gaps("gw-1", 1), now=0.0) == [ResendRequest("gw-1", "d0", "b")]
    assert pacer.due(gaps("gw-1", 1), now=9.9) == []
    assert pacer.due(gaps("gw-1", 1), now=10.0) == [ResendRequest("gw-1", "d0", "b")]


def test_it_asks_a_gateway_with_many_gaps_for_everything_once_instead_of_per_source() -> None:
    pacer = throttle(per_gateway=3)
    first = pacer.due(gaps("gw-1", 10_000), now=0.0)
    assert first == [ResendRequest("gw-1", f"d{i}", "b") for i in range(3)] + \
        [ResendRequest("gw-1", None, None)]
    assert pacer.due(gaps("gw-1", 10_000), now=5.0) == []
    assert pacer.due(gaps("gw-2", 1), now=5.0) == [ResendRequest("gw-2", "d0", "b")]
    assert len(pacer.due(gaps("gw-1", 10_000), now=10.0)) == 4  # the next interval


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 500), st.floats(0, 5)),
                max_size=60))
def test_it_remembers_a_bounded_number_of_sources_and_gateways(
        bursts: list[tuple[int, int, float]]) -> None:
    pacer = throttle(per_gateway=5, max_tracked=100)
    now = 0.0
    for gateway, devices, later in bursts:
        now += later
        asked = pacer.due(gaps(f"gw-{gateway}", devices, boot=f"b{now}"), now=now)
        assert len(asked) <= 6
        assert len(pacer) <= 200
