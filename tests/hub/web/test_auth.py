"""The console's pure decisions: password checks, tokens, cookie flags and the login limiter."""

from __future__ import annotations

from pathlib import Path

from argon2 import PasswordHasher, extract_parameters
from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.store.records import Role, User
from careflow.hub.web import auth
from careflow.hub.web.auth import LoginLimiter, check_password, hash_password
from tests.conftest import make_settings

MINUTE = 60_000


def _user(hashed: str) -> User:
    return User("ana", Role.OPERATOR, hashed, 1)


def test_it_checks_a_password_against_its_argon2id_hash() -> None:
    hashed = hash_password("correct horse battery")
    assert hashed.startswith("$argon2id$")
    assert check_password(_user(hashed), "correct horse battery") == (True, None)
    assert check_password(_user(hashed), "correct horse batter") == (False, None)
    assert check_password(_user(hashed), "") == (False, None)


def test_a_hash_made_with_weaker_parameters_is_replaced_at_login() -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("old password!")
    ok, renewed = check_password(_user(weak), "old password!")
    assert ok and renewed is not None and renewed != weak
    assert extract_parameters(renewed) == extract_parameters(hash_password("x"))
    assert check_password(_user(renewed), "old password!") == (True, None)
    assert check_password(_user(weak), "wrong") == (False, None)  # no rehash on a failure


def test_an_unknown_user_costs_one_real_verification_and_never_matches() -> None:
    assert check_password(None, "anything at all") == (False, None)
    # the dummy it verified against is as costly as a real hash
    assert extract_parameters(auth.DUMMY_HASH) == extract_parameters(hash_password("x"))
    assert check_password(_user(auth.NO_PASSWORD), auth.NO_PASSWORD) == (False, None)
    assert check_password(_user("garbage"), "garbage") == (False, None)


def test_sessions_are_kept_by_hash_and_csrf_compares_in_constant_time() -> None:
    token = auth.new_token()
    assert len(token) >= 43 and auth.new_token() != token
    assert auth.token_hash(token) != token and len(auth.token_hash(token)) == 64
    assert auth.csrf_matches("abc", "abc")
    assert not auth.csrf_matches("abc", "abd")
    assert not auth.csrf_matches("abc", None)
    assert not auth.csrf_matches("", "")
    key = b"k" * 32
    assert auth.header_csrf(key, "ana") != auth.header_csrf(key, "bo")
    assert auth.header_csrf(key, "ana") != auth.header_csrf(b"j" * 32, "ana")


def test_cookies_are_secure_behind_https(tmp_path: Path) -> None:
    plain = make_settings(tmp_path, None)
    public = make_settings(tmp_path, None, CAREFLOW_PUBLIC_URL="https://care.example.org")
    assert auth.cookie_flags(plain, "http") == {"httponly": True, "samesite": "lax",
                                                 "secure": False}
    assert auth.cookie_flags(plain, "https")["secure"] is True
    assert auth.cookie_flags(public, "http")["secure"] is True


def test_user_names_are_plain_words_or_mail_addresses() -> None:
    assert auth.valid_user_name("kari") and auth.valid_user_name("kari.n@example.org")
    for bad in ("", "-x", "a b", "<script>", "x" * 65, "ana\n", "é"):
        assert not auth.valid_user_name(bad), bad


def test_the_limiter_refuses_after_five_failures_until_the_oldest_leaves_the_window() -> None:
    limiter = LoginLimiter()
    for minute in range(4):
        limiter.failed("ana", "10.0.0.1", now_ms=minute * MINUTE)
        assert limiter.retry_at("ana", "10.0.0.1", now_ms=minute * MINUTE) is None
    limiter.failed("ANA", "10.0.0.1", now_ms=4 * MINUTE)  # names are case-insensitive here
    assert limiter.retry_at("ana", "10.0.0.1", now_ms=4 * MINUTE) == 15 * MINUTE
    assert limiter.retry_at("ana", "10.0.0.1", now_ms=15 * MINUTE - 1) == 15 * MINUTE
    assert limiter.retry_at("ana", "10.0.0.2", now_ms=5 * MINUTE) is None  # another address
    assert limiter.retry_at("bo", "10.0.0.1", now_ms=5 * MINUTE) is None  # another name
    assert limiter.retry_at("ana", "10.0.0.1", now_ms=15 * MINUTE) is None  # one left the window
    limiter.failed("ana", "10.0.0.1", now_ms=15 * MINUTE)
    assert limiter.retry_at("ana", "10.0.0.1", now_ms=15 * MINUTE) == 16 * MINUTE


def test_the_limiter_counts_an_ipv6_client_by_its_64_and_a_mapped_ipv4_as_ipv4() -> None:
    """One IPv6 subscriber holds 2**64 addresses: a new one per try must not mean new tries."""
    limiter = LoginLimiter()
    for n in range(5):
        limiter.failed("ana", f"2001:db8:1:2::{n + 1:x}", now_ms=n)
    assert limiter.retry_at("ana", "2001:db8:1:2:ffff:ffff:ffff:fffe", now_ms=5) is not None
    assert limiter.retry_at("ana", "2001:db8:1:2::1%eth0", now_ms=5) is not None
    assert limiter.retry_at("ana", "2001:db8:1:3::1", now_ms=5) is None  # another subscriber
    for n in range(5):
        limiter.failed("bo", "::ffff:10.0.0.1", now_ms=n)
    assert limiter.retry_at("bo", "10.0.0.1", now_ms=5) is not None
    assert limiter.retry_at("bo", "10.0.0.2", now_ms=5) is None
    assert auth.client_network("testclient") == "testclient"


def test_the_limiter_keeps_little_of_a_long_name() -> None:
    limiter = LoginLimiter(max_failures=1)
    limiter.failed("x" * 10_000, "a" * 1_000, now_ms=0)
    ((user, address),) = limiter._failures
    assert len(user) <= 80 and len(address) <= 64
    assert limiter.retry_at("x" * 10_000, "a" * 1_000, now_ms=1) is not None


def test_a_good_login_forgets_the_failures() -> None:
    limiter = LoginLimiter(max_failures=2)
    limiter.failed("ana", "a", now_ms=0)
    limiter.succeeded("ana", "a")
    limiter.failed("ana", "a", now_ms=1)
    assert limiter.retry_at("ana", "a", now_ms=1) is None


@given(st.lists(st.tuples(st.sampled_from(["ana", "bo", "cy", "Ana"]), st.sampled_from("abc"),
                          st.integers(0, 5 * MINUTE)), max_size=200))
def test_the_limiter_stays_bounded_and_refuses_only_pairs_that_failed_enough(
        attempts: list[tuple[str, str, int]]) -> None:
    limiter = LoginLimiter(max_failures=3, window_ms=10 * MINUTE, max_keys=5)
    now, seen = 0, []
    for user, address, step in attempts:
        now += step
        limiter.failed(user, address, now_ms=now)
        seen.append((user.lower(), address, now))
        assert len(limiter) <= 5
    for user, address, _ in attempts:
        refused = limiter.retry_at(user, address, now_ms=now)
        recent = [t for u, a, t in seen if (u, a) == (user.lower(), address)
                  and t > now - 10 * MINUTE]
        if len(recent) < 3:
            assert refused is None
        if refused is not None:
            assert now < refused <= now + 10 * MINUTE
