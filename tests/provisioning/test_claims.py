"""The claim flow's pure decisions: registration, claims, renewals, rate limit, rotation timing."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.provisioning.claims import (
    ID_PATTERN,
    ClaimRecord,
    Proceed,
    RefusalLog,
    Registration,
    Reject,
    State,
    decide_claim,
    decide_registration,
    decide_renewal,
    expiring,
    gateway_id_for,
    hash_token,
    rate_limit,
    renew_at_ms,
    tokens_match,
)

NOW = 1_800_000_000_000
TOKEN = "s3cret-token"


def record(state: State = State.REGISTERED, **changes: object) -> ClaimRecord:
    base = ClaimRecord(serial="SN-1", site="berlin", gateway_id="gw-sn-1", state=state,
                       token_hash=hash_token(TOKEN), token_expires_ms=NOW + 3_600_000,
                       registered_ms=NOW - 1000)
    return replace(base, **changes)  # type: ignore[arg-type]


def claim(rec: ClaimRecord | None, token: str = TOKEN, key: str = "key-a",
          now_ms: int = NOW) -> Proceed | Reject:
    return decide_claim(rec, serial="SN-1", token=token, key_fingerprint=key, now_ms=now_ms)


def code(verdict: object) -> str:
    return verdict.code if isinstance(verdict, Reject) else "ok"


@pytest.mark.parametrize(("rec", "token", "now_ms", "expected"), [
    (None, TOKEN, NOW, "unknown_serial"),
    (record(), TOKEN, NOW, "ok"),
    (record(), "wrong", NOW, "token_invalid"),
    (record(), TOKEN, NOW + 3_600_000, "token_expired"),
    (record(State.ACTIVE, key_fingerprint="key-a"), TOKEN, NOW, "already_active"),
    (record(State.REVOKED), TOKEN, NOW, "revoked"),
    (record(State.ISSUED, key_fingerprint="key-b"), TOKEN, NOW, "token_used"),
    (record(State.CLAIMED, key_fingerprint="key-b"), TOKEN, NOW, "token_used"),
    (record(State.REGISTERED, token_hash=None), TOKEN, NOW, "token_invalid"),
])
def test_it_decides_claims(rec: ClaimRecord | None, token: str, now_ms: int,
                           expected: str) -> None:
    assert code(claim(rec, token, now_ms=now_ms)) == expected


def test_it_replays_a_claim_whose_answer_was_lost() -> None:
    assert claim(record(State.ISSUED, key_fingerprint="key-a")) == Proceed(replay=True)
    assert claim(record(State.CLAIMED, key_fingerprint="key-a")) == Proceed(replay=True)


def test_it_checks_the_token_before_revealing_the_state() -> None:
    assert code(claim(record(State.ACTIVE), token="guess")) == "token_invalid"


@given(st.text(min_size=1, max_size=40))
def test_it_never_accepts_another_token(guess: str) -> None:
    if guess != TOKEN:
        assert code(claim(record(), token=guess)) == "token_invalid"
        assert not tokens_match(guess, hash_token(TOKEN))


@given(st.text(min_size=1, max_size=80))
def test_it_derives_a_valid_topic_safe_gateway_id(serial: str) -> None:
    gateway_id = gateway_id_for(serial)
    assert ID_PATTERN.match(gateway_id)
    assert not set("/+#") & set(gateway_id)
    assert gateway_id_for(serial) == gateway_id


def test_it_lowercases_serials_into_gateway_ids() -> None:
    assert gateway_id_for("SN-0042/A") == "gw-sn-0042-a"


@pytest.mark.parametrize(("existing", "replace_", "owner", "expected"), [
    (None, False, None, "ok"),
    (record(), False, "SN-1", "ok"),
    (record(State.REVOKED), False, "SN-1", "ok"),
    (record(State.ACTIVE, cert_serial="ab"), False, "SN-1", "already_provisioned"),
    (record(State.ISSUED, cert_serial="ab"), False, "SN-1", "already_provisioned"),
    (None, False, "SN-2", "gateway_taken"),
])
def test_it_decides_registrations(existing: ClaimRecord | None, replace_: bool,
                                  owner: str | None, expected: str) -> None:
    verdict = decide_registration(existing, serial="SN-1", site="berlin", gateway_id="gw-sn-1",
                                  gateway_owner=owner, replace=replace_)
    assert code(verdict) == expected


def test_it_names_the_old_certificate_when_replacing() -> None:
    verdict = decide_registration(record(State.ACTIVE, cert_serial="ab12"), serial="SN-1",
                                  site="berlin", gateway_id="gw-sn-1", gateway_owner="SN-1",
                                  replace=True)
    assert verdict == Registration(revoke_cert_serial="ab12")


def test_it_refuses_ids_outside_the_contract() -> None:
    verdict = decide_registration(None, serial="bad/serial", site="x", gateway_id="gw-x",
                                  gateway_owner=None, replace=False)
    assert code(verdict) == "invalid"


def test_it_renews_only_issued_or_active_identities() -> None:
    assert decide_renewal(record(State.ACTIVE), gateway_id="gw-sn-1") == Proceed()
    assert code(decide_renewal(None, gateway_id="gw-x")) == "unknown_gateway"
    assert code(decide_renewal(record(State.REVOKED), gateway_id="gw-sn-1")) == "not_renewable"


@given(st.lists(st.integers(min_value=0, max_value=3_000_000), max_size=30),
       st.integers(min_value=1, max_value=8))
def test_it_never_allows_more_than_the_limit_in_any_window(offsets: list[int], limit: int) -> None:
    window = 600_000
    allowed: list[int] = []
    for now in sorted(offsets):
        wait = rate_limit(allowed, now, limit=limit, window_ms=window)
        if wait is None:
            allowed.append(now)
        else:
            assert wait >= 1
            # waiting as long as told is enough
            assert rate_limit(allowed, now + wait * 1000, limit=limit, window_ms=window) is None
    for start in allowed:
        assert sum(start <= t < start + window for t in allowed) <= limit


def test_it_tells_how_long_to_wait() -> None:
    attempts = [NOW + i * 1000 for i in range(5)]
    assert rate_limit(attempts, NOW + 5000) == 595
    assert rate_limit(attempts[:4], NOW + 5000) is None


def test_it_renews_at_two_thirds_of_the_lifetime() -> None:
    assert renew_at_ms(0, 30 * 86_400_000) == 20 * 86_400_000


def test_it_finds_certificates_near_their_end() -> None:
    soon = record(State.ACTIVE, cert_not_after_ms=NOW + 86_400_000)
    later = record(State.ACTIVE, serial="SN-2", cert_not_after_ms=NOW + 30 * 86_400_000)
    gone = record(State.REVOKED, serial="SN-3", cert_not_after_ms=NOW)
    assert expiring([soon, later, gone], now_ms=NOW, within_ms=7 * 86_400_000) == [soon]


@given(st.lists(st.integers(NOW - 2_000_000, NOW + 1000), max_size=40), st.integers(1, 8))
def test_rate_limit_without_sorting_says_what_sorting_said(attempts: list[int],
                                                           limit: int) -> None:
    window = 600_000
    recent = sorted(t for t in attempts if NOW - window < t <= NOW)
    expected = None if len(recent) < limit else max(1, -(-(recent[-limit] + window - NOW)
                                                        // 1000))
    assert rate_limit(attempts, NOW, limit=limit, window_ms=window) == expected


def test_the_refusal_log_folds_by_source_serial_and_code_and_stays_bounded() -> None:
    refusals = RefusalLog(max_keys=2)
    assert refusals.note(source="claim-a", serial="SN-1", code="token_invalid", now_ms=NOW)
    assert not refusals.note(source="claim-a", serial="SN-1", code="token_invalid",
                             now_ms=NOW + 5)
    assert refusals.note(source="claim-b", serial="SN-2", code="unknown_serial", now_ms=NOW)
    for i in range(100):  # beyond the bound: counted under "*", never a new key each
        refusals.note(source=f"claim-{i}", serial=f"SN-{i}", code="unknown_serial",
                      now_ms=NOW + i)
    taken = {(r.source, r.serial, r.code): (r.first_ms, r.last_ms, r.count)
             for r in refusals.take()}
    assert taken == {("claim-a", "SN-1", "token_invalid"): (NOW, NOW + 5, 2),
                     ("claim-b", "SN-2", "unknown_serial"): (NOW, NOW, 1),
                     ("*", "*", "unknown_serial"): (NOW, NOW + 99, 100)}
    assert len(refusals) == 0 and refusals.take() == []
