"""The claim and renewal request parser against hostile bytes (property tests)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.core.errors import ContractError
from careflow.provisioning import pki as pki_mod
from careflow.provisioning.protocol import (
    MAX_REQUEST_DEPTH,
    MAX_REQUEST_MESSAGE_BYTES,
    decode_request,
    renew_topic,
    request_topic,
)
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.provisioning.service import DeviceConfig, ProvisioningService
from tests.conftest import make_settings
from tests.hostile import hostile_payloads as hostile_event_payloads
from tests.hostile import nested_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)


def nested(depth: int, opener: str, inner: str = "1") -> str:
    """``depth`` arrays (``[``) or objects (``{``) around ``inner``."""
    if opener == "[":
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


def _reference_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_reference_depth(v) for v in value.values()), default=0)
    return 0


hostile_payloads = st.one_of(
    hostile_event_payloads(),  # the shared ones (tests/hostile.py), built for event topics
    st.builds(lambda d, shape: ('{"serial":"SN-1","x":' + nested_json(d, shape=shape) + "}"
                                ).encode(),
              st.integers(MAX_REQUEST_DEPTH - 2, 20_000), st.sampled_from(["array", "mixed"])),
    st.binary(max_size=2000),
    st.text(max_size=500).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda d, o: nested(d, o).encode(), st.integers(1, 30_000), st.sampled_from("[{")),
    # a flat-looking claim whose extra field hides deep nesting, or brackets inside strings
    st.builds(lambda d, s: (
        '{"serial":"SN-1","token":"t","csr":"' + s.replace("\\", "").replace('"', "")
        + '","request_id":"r","x":' + nested(d, "[") + "}").encode(),
        st.integers(0, 5000), st.text(alphabet="[]{}\\\"ab", max_size=50)),
    json_values.map(lambda v: json.dumps(v).encode("utf-16")),
    st.just(b"[" * (MAX_REQUEST_MESSAGE_BYTES + 1)),
)


@given(hostile_payloads)
@settings(max_examples=300)
def test_decode_request_returns_an_object_or_refuses_with_bad_request(payload: bytes) -> None:
    outcome: dict[str, Any] | ContractError
    try:
        outcome = decode_request(payload)
    except ContractError as exc:
        outcome = exc
    if isinstance(outcome, ContractError):
        assert outcome.code == "bad_request" and str(outcome)
    else:
        assert isinstance(outcome, dict)
        assert _reference_depth(outcome) <= MAX_REQUEST_DEPTH


def test_it_refuses_nesting_beyond_the_limit_before_decoding() -> None:
    with pytest.raises(ContractError, match="deeper"):
        decode_request(nested(30_000, "[").encode())
    assert decode_request(('{"x":' + nested(MAX_REQUEST_DEPTH - 1, "[") + "}").encode())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvisioningService]:
    directory: Path = tmp_path_factory.mktemp("hostile")
    pki_mod.init_pki(directory / "pki", now=datetime.now(UTC), force=True)
    registry = SqliteProvisioningRegistry(directory / "careflow.db", synchronous="normal")
    yield ProvisioningService(make_settings(directory, "mqtt://127.0.0.1:1"), registry,
                              pki_mod.load_pki(directory / "pki"),
                              device=DeviceConfig(broker_url="mqtt://hub:1883"))
    registry.close()


@given(hostile_payloads, st.sampled_from([request_topic("claim-x"), renew_topic("gw-x")]))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_service_answers_every_hostile_request_with_one_refusal(
        service: ProvisioningService, payload: bytes, topic: str) -> None:
    [(reply_to, body)] = service.handle(topic, payload)
    assert reply_to.endswith("/rejected")
    assert json.loads(body)["code"] in {"bad_request", "unknown_serial", "unknown_gateway",
                                        "csr_invalid", "rate_limited"}
