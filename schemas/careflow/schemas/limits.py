"""Size and shape limits of the contract, known to both sides.

The gateway agent refuses (and reports) an event it could never deliver, and packs batches that
the hub will take; the hub refuses anything beyond these with a reason. One module, so the two
sides cannot drift apart.
"""

from __future__ import annotations

__all__ = [
    "MAX_BATCH_EVENTS",
    "MAX_DATA_DEPTH",
    "MAX_EVENT_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_PAYLOAD_DEPTH",
]

# One MQTT message (an event, or a batch of them) as the hub takes it by default
# (CAREFLOW_MAX_MESSAGE_BYTES may raise it on the hub; gateways keep to this default).
# Mosquitto's own `max_packet_size` must stay above it (mosquitto/mosquitto.conf).
MAX_MESSAGE_BYTES = 256 * 1024

# One event, encoded as compact JSON (UTF-8). Small enough that a batch of such events never
# exceeds MAX_MESSAGE_BYTES by more than one event's worth, so packing is a simple sum.
MAX_EVENT_BYTES = 64 * 1024

# The most events one batch message may carry.
MAX_BATCH_EVENTS = 100

# How deep `data` may nest (objects and arrays inside `data`; `{"a": 1}` as data is depth 1).
# Real readings are flat or nearly so; deep nesting is only ever an attack or a bug, and at
# ~1000 levels it exhausts Python's recursion in every layer that walks it.
MAX_DATA_DEPTH = 16

# The deepest a whole payload may be: a batch array, the event object, then `data`.
MAX_PAYLOAD_DEPTH = MAX_DATA_DEPTH + 2
