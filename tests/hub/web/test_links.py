"""Signing and checking one-tap links: pure, property-tested against hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.web.links import (
    MAX_TOKEN,
    LinkAction,
    LinkClaim,
    LinkSigner,
    Refusal,
    csrf_ok,
    csrf_token,
    sign,
    verify,
)

KEY = b"k" * 64
EXPIRES_MS = 1_800_000_000_000
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."

link_ids = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                   min_size=16, max_size=16)
channels = st.from_regex(r"[a-z0-9_-]{1,64}", fullmatch=True)
actions = st.sampled_from(list(LinkAction))
incidents = st.integers(min_value=1, max_value=10**15)


def _token(incident_id: int = 42, action: LinkAction = LinkAction.ACKNOWLEDGE,
           channel: str = "oncall", link_id: str = "abcdefghijklmnop") -> str:
    return sign(KEY, incident_id=incident_id, action=action, channel=channel,
                expires_ms=EXPIRES_MS, link_id=link_id)


@given(incidents, actions, channels, link_ids)
def test_it_gives_back_what_it_signed(incident_id: int, action: LinkAction, channel: str,
                                      link_id: str) -> None:
    token = _token(incident_id, action, channel, link_id)
    assert len(token) <= MAX_TOKEN
    assert verify(KEY, token, now_ms=EXPIRES_MS - 1) == LinkClaim(
        incident_id, action, channel, EXPIRES_MS, link_id)


@given(st.data())
def test_it_refuses_any_change_to_a_token(data: st.DataObject) -> None:
    token = _token(data.draw(incidents), data.draw(actions), data.draw(channels),
                   data.draw(link_ids))
    position = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    change = data.draw(st.sampled_from(["replace", "delete", "insert"]))
    char = data.draw(st.sampled_from(ALPHABET))
    if change == "replace":
        changed = token[:position] + char + token[position + 1:]
    elif change == "delete":
        changed = token[:position] + token[position + 1:]
    else:
        changed = token[:position] + char + token[position:]
    if changed == token:
        return
    assert isinstance(verify(KEY, changed, now_ms=0), Refusal)


@given(st.text(max_size=2000))
def test_it_refuses_garbage_without_raising(garbage: str) -> None:
    assert isinstance(verify(KEY, garbage, now_ms=0), Refusal)
    assert csrf_ok(KEY, garbage, garbage) is False


@given(st.integers(min_value=-10**6, max_value=10**6))
def test_it_works_until_the_expiry_second_and_not_from_it(offset_ms: int) -> None:
    result = verify(KEY, _token(), now_ms=EXPIRES_MS + offset_ms)
    if offset_ms < 0:
        assert isinstance(result, LinkClaim)
    else:
        assert result is Refusal.EXPIRED


def test_it_refuses_a_link_signed_with_another_key_as_forged() -> None:
    other = sign(b"o" * 64, incident_id=42, action=LinkAction.RESOLVE, channel="oncall",
                 expires_ms=EXPIRES_MS, link_id="abcdefghijklmnop")
    assert verify(KEY, other, now_ms=0) is Refusal.FORGED


def test_it_refuses_huge_and_non_ascii_tokens_as_malformed() -> None:
    assert verify(KEY, _token() + "A" * 10**6, now_ms=0) is Refusal.MALFORMED
    assert verify(KEY, _token().replace("oncall", "öncall"), now_ms=0) is Refusal.MALFORMED
    assert verify(KEY, "", now_ms=0) is Refusal.MALFORMED


def test_it_does_not_accept_a_second_spelling_of_one_signature() -> None:
    token = _token()
    last = token[-1]
    # the last base64 character carries 4 unused bits: another character may decode alike
    twins = [c for c in ALPHABET[:-1] if c != last]
    assert all(isinstance(verify(KEY, token[:-1] + c, now_ms=0), Refusal) for c in twins)


def test_it_ties_the_csrf_field_to_one_link() -> None:
    token, other = _token(), _token(link_id="ponmlkjihgfedcba")
    assert csrf_ok(KEY, token, csrf_token(KEY, token))
    assert not csrf_ok(KEY, token, csrf_token(KEY, other))
    assert not csrf_ok(KEY, token, "")
    assert not csrf_ok(KEY, token, csrf_token(b"o" * 64, token))


def test_it_makes_fresh_urls_that_verify_for_their_channel() -> None:
    signer = LinkSigner(KEY, "https://care.example.org/", ttl_s=86_400)
    first = signer.url(incident_id=7, action="silence", channel="oncall", now_ms=1_000_000)
    second = signer.url(incident_id=7, action="silence", channel="oncall", now_ms=1_000_000)
    assert first.startswith("https://care.example.org/l/") and first != second
    claim = verify(KEY, first.rsplit("/", 1)[1], now_ms=1_000_000)
    assert isinstance(claim, LinkClaim)
    assert (claim.incident_id, claim.action, claim.channel) == (7, LinkAction.SILENCE, "oncall")
    assert claim.expires_ms == 1_000_000 + 86_400_000


def test_it_refuses_to_sign_what_cannot_go_in_a_link() -> None:
    with pytest.raises(ValueError, match="cannot sign"):
        _token(channel="on.call")
