"""The dedupe decision, tested as a pure function."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.ingest.dedupe import Candidate, Verdict, judge

candidates = st.builds(
    Candidate,
    id=st.sampled_from(["id-a", "id-b", "id-c"]),
    key=st.tuples(st.just("gw"), st.sampled_from(["d1", "d2"]), st.sampled_from(["b1", "b2"]),
                  st.integers(1, 3)),
    type=st.sampled_from(["heartbeat", "status"]),
    time=st.sampled_from(["2026-11-27T05:00:00Z", "2026-11-27T05:00:01Z"]),
    data=st.dictionaries(st.sampled_from(["interval_s", "state"]), st.integers(0, 2), max_size=2),
)


def restamped(c: Candidate, new_id: str) -> Candidate:
    return Candidate(new_id, c.key, c.type, c.time, c.data)


@given(candidates)
def test_it_calls_an_unseen_event_fresh(c: Candidate) -> None:
    assert judge(c, None, None)[0] is Verdict.FRESH


@given(candidates)
def test_it_calls_an_exact_repeat_a_duplicate(c: Candidate) -> None:
    assert judge(c, c, c)[0] is Verdict.DUPLICATE


@given(candidates, st.text(min_size=1, max_size=5))
def test_it_catches_a_retry_restamped_with_a_new_id(c: Candidate, suffix: str) -> None:
    retry = restamped(c, c.id + suffix)
    assert judge(retry, None, c)[0] is Verdict.DUPLICATE


@given(candidates, candidates)
def test_it_never_drops_a_different_event_as_a_duplicate(new: Candidate, old: Candidate) -> None:
    by_id = old if old.id == new.id else None
    by_key = old if old.key == new.key else None
    verdict, reason = judge(new, by_id, by_key)
    if by_id is None and by_key is None:
        assert verdict is Verdict.FRESH
    elif verdict is Verdict.DUPLICATE:
        # only a faithful copy (same position, same content) may be skipped
        assert new.key == old.key and new.same_content(old)
    else:
        assert verdict is Verdict.CONFLICT and reason


def test_it_explains_a_reused_sequence_position() -> None:
    old = Candidate("id-a", ("gw", "d", "b", 7), "status", "t1", {"state": "ok"})
    new = Candidate("id-b", ("gw", "d", "b", 7), "status", "t2", {"state": "fault"})
    verdict, reason = judge(new, None, old)
    assert verdict is Verdict.CONFLICT
    assert "boot" in reason and "gw/d/b/7" in reason
