"""The provisioning protocol over MQTT: topics and messages, outside the event tree.

A claim (by a gateway holding the shared claim certificate and a one-time token)::

    careflow/provision/{client id}/request    {serial, token, csr, request_id}
    careflow/provision/{client id}/accepted   {status, request_id, certificate, ca_chain,
                                               gateway_id, config}
    careflow/provision/{client id}/rejected   {status, request_id, code, message, retry_after_s?}

A renewal (by a gateway holding its own device certificate) goes to
``careflow/provision/{gateway id}/renew`` ({csr, request_id}) and is answered on the same
``accepted``/``rejected`` topics of ``{gateway id}``. Renewals have a topic of their own so that
the broker's ACL can let only the holder of the device certificate for ``{gateway id}`` publish
there (``pattern write careflow/provision/%u/renew``, the username being the certificate's CN),
while claims are bound to the client id (``%c``). The client subscribes to the answers before it
sends the request, so an answer cannot be missed.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from careflow.core.errors import ContractError
from careflow.schemas.codec import decode_json
from careflow.schemas.limits import MAX_PAYLOAD_DEPTH

__all__ = [
    "PROVISION_PREFIX",
    "PROVISION_SUBSCRIPTIONS",
    "AcceptedReply",
    "ClaimRequest",
    "RejectedReply",
    "RenewRequest",
    "accepted_topic",
    "claim_client_id",
    "decode_request",
    "parse_provision_topic",
    "rejected_topic",
    "renew_topic",
    "request_topic",
]

PROVISION_PREFIX = "careflow/provision"
PROVISION_SUBSCRIPTIONS = (f"{PROVISION_PREFIX}/+/request", f"{PROVISION_PREFIX}/+/renew")
MAX_REQUEST_BYTES = 16 * 1024  # a P-256 CSR is under 1 KiB; anything far larger is refused
# A whole request: the CSR at its largest, its JSON escapes and the other fields fit well below.
MAX_REQUEST_MESSAGE_BYTES = 4 * MAX_REQUEST_BYTES
# A request is one flat object; the contract's payload depth is a generous ceiling.
MAX_REQUEST_DEPTH = MAX_PAYLOAD_DEPTH
_TOPIC = re.compile(r"^careflow/provision/(?P<client>[^/+#]+)/(?P<kind>request|renew)\Z")


def request_topic(client_id: str) -> str:
    """Where a claimant sends its claim."""
    return f"{PROVISION_PREFIX}/{client_id}/request"


def renew_topic(gateway_id: str) -> str:
    """Where a provisioned gateway asks for a fresh certificate."""
    return f"{PROVISION_PREFIX}/{gateway_id}/renew"


def accepted_topic(client_id: str) -> str:
    """Where the hub answers yes (certificate and configuration)."""
    return f"{PROVISION_PREFIX}/{client_id}/accepted"


def rejected_topic(client_id: str) -> str:
    """Where the hub answers no (code, message, maybe retry_after_s)."""
    return f"{PROVISION_PREFIX}/{client_id}/rejected"


def claim_client_id(serial: str) -> str:
    """The MQTT client id (and topic level) a claimant uses: ``claim-<serial>``, topic-safe."""
    return "claim-" + re.sub(r"[^A-Za-z0-9_.-]", "-", serial)[:64]


def parse_provision_topic(topic: str) -> tuple[str, Literal["request", "renew"]] | None:
    """(client or gateway id, kind) of a request topic, or None."""
    match = _TOPIC.match(topic)
    if match is None:
        return None
    return match["client"], "request" if match["kind"] == "request" else "renew"


def decode_request(payload: bytes) -> dict[str, Any]:
    """A claim or renewal request's JSON object, bounded in size and depth.

    Raises:
        ContractError: ``bad_request`` with what is wrong (too large, too deep, not JSON, not
            an object); never anything else, whatever the bytes.
    """
    if len(payload) > MAX_REQUEST_MESSAGE_BYTES:
        msg = (f"the request is over {MAX_REQUEST_MESSAGE_BYTES} bytes, the most that is "
               "read")
        raise ContractError("bad_request", msg)
    try:  # the contract's decoder: strict UTF-8 JSON; too deep is refused, never a RecursionError
        body = decode_json(payload, max_depth=MAX_REQUEST_DEPTH)
    except ContractError as exc:
        msg = (f"the request nests deeper than {MAX_REQUEST_DEPTH} levels; it is one flat object"
               if exc.code == "too_deep" else f"the request is not JSON: {exc}")
        raise ContractError("bad_request", msg) from exc
    if not isinstance(body, dict):
        raise ContractError("bad_request", "the request must be a JSON object")
    return body


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ClaimRequest(_Message):
    """A claim: who the device says it is, its one-time token and its CSR."""

    serial: str = Field(min_length=1, max_length=64)
    token: str = Field(min_length=1, max_length=256)
    csr: str = Field(min_length=1, max_length=MAX_REQUEST_BYTES)
    request_id: str = Field(min_length=1, max_length=64)


class RenewRequest(_Message):
    """A renewal: the broker already authenticated the sender by its device certificate."""

    csr: str = Field(min_length=1, max_length=MAX_REQUEST_BYTES)
    request_id: str = Field(min_length=1, max_length=64)


class AcceptedReply(_Message):
    """A signed certificate, the CA chain to trust, and what the gateway needs to run."""

    status: Literal["accepted"] = "accepted"
    request_id: str
    gateway_id: str
    certificate: str
    ca_chain: str
    config: dict[str, Any]


class RejectedReply(_Message):
    """A refusal; ``retry_after_s`` is set when waiting helps (rate limit)."""

    status: Literal["rejected"] = "rejected"
    request_id: str | None = None
    code: str
    message: str
    retry_after_s: int | None = None
