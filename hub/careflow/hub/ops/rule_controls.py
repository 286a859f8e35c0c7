"""Noisy rules quieted by a person: may this rule be muted or disabled, is it now, and may a
silence cover it fleet-wide. Pure: the CLI, the hub's alert stage and the agent's action
registry pass in the rule's severity and ``now``.

Which rules are never quieted, and why: every **critical** rule, whatever its name, and by name
``care-alarm``, ``refused-care-alarm`` and the hub's own rules (``hub-*``), whatever severity a
custom rules folder gives them. A critical incident means a person may not be reached: a care
alarm, a care alarm that could not be delivered (refused, an unreadable spool entry), a gateway
that cannot pass alarms on, or the hub failing to watch. Quieting such a rule hides every home's
emergency at once; the narrow tools stay: a silence that names the gateway (with an end),
pausing a device, or lowering the rule's severity in a reviewed rules file.

The hub applies the same test to what the store holds (:func:`in_force`), so a row written
behind careflow's back, or a rule made critical since it was muted, never quiets an alarm.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from careflow.hub.alerting.selfwatch import SELF_RULES
from careflow.hub.store.records import Incident, RuleControl, RuleControlKind

__all__ = [
    "ALWAYS_ANNOUNCED",
    "MAX_MUTE_MS",
    "SELF_RULE_PREFIX",
    "InForce",
    "announce_again",
    "describe",
    "in_force",
    "mute_refusal",
    "quiet_refusal",
    "silence_refusal",
]

ALWAYS_ANNOUNCED = frozenset({"care-alarm", "refused-care-alarm"})
SELF_RULE_PREFIX = "hub-"
MAX_MUTE_MS = 7 * 86_400_000  # a mute must end: at most a week, then it is announced again
_PATTERN_CHARS = frozenset("*?[")


def quiet_refusal(rule: str, severity: str | None) -> str | None:
    """Why ``rule`` may not be muted or disabled (None: it may).

    Args:
        rule: the rule's name.
        severity: its severity in the loaded rules (None: no such rule is loaded).
    """
    if rule in ALWAYS_ANNOUNCED or severity == "critical":
        return (f"{rule} is a critical rule (a person may not be reached): it is never muted "
                "or disabled; for one noisy gateway add a silence that names it "
                f"(careflow silences add -g GATEWAY -r {rule} --for 1h --reason ...), or "
                "pause the device (careflow devices pause)")
    if rule.startswith(SELF_RULE_PREFIX):
        return (f"{rule} is the hub watching itself: it is never muted or disabled; fix what "
                "it reports (careflow status)")
    if severity is None:
        return f"there is no rule {rule!r}; `careflow rules list` shows them"
    return None


def mute_refusal(duration_ms: int | None) -> str | None:
    """Why a mute of this length is refused (None: it is fine): a mute must end."""
    if duration_ms is None or duration_ms <= 0:
        return "a mute must end: give --for, e.g. --for 4h (at most 7d)"
    if duration_ms > MAX_MUTE_MS:
        return ("a mute lasts at most 7 days (then the rule is announced again); to stop a "
                "rule for longer, disable it (careflow rules disable RULE --reason ...)")
    return None


@dataclass(frozen=True, slots=True)
class InForce:
    """The controls in force at one moment, by rule."""

    muted: Mapping[str, RuleControl] = field(default_factory=dict)
    disabled: Mapping[str, RuleControl] = field(default_factory=dict)

    def quieted(self, rule: str) -> RuleControl | None:
        """The control that quiets this rule's announcements now, if any."""
        return self.disabled.get(rule) or self.muted.get(rule)

    def __bool__(self) -> bool:
        return bool(self.muted or self.disabled)


def in_force(controls: Iterable[RuleControl], severities: Mapping[str, str],
             now_ms: int) -> InForce:
    """The controls that apply at ``now_ms``: a mute until its end (and never longer than
    MAX_MUTE_MS after it was set, nor without an end), a disable until enabled; none for a rule
    that may not be quieted (see the module) or is not loaded."""
    muted: dict[str, RuleControl] = {}
    disabled: dict[str, RuleControl] = {}
    for control in controls:
        if quiet_refusal(control.rule, severities.get(control.rule)) is not None:
            continue
        if control.kind is RuleControlKind.DISABLED:
            disabled[control.rule] = control
        elif control.until_ms is not None and now_ms < min(control.until_ms,
                                                           control.at_ms + MAX_MUTE_MS):
            muted[control.rule] = control
    return InForce(muted, disabled)


def describe(control: RuleControl, *, iso: str | None = None) -> str:
    """One line for people: status, digests, logs (``iso``: the mute's end as the caller
    writes times; by default UTC to the minute)."""
    if control.kind is RuleControlKind.DISABLED:
        return f"{control.rule} disabled by {control.by}: {control.reason}"
    until = iso or _utc(control.until_ms or 0)
    return f"{control.rule} muted until {until} by {control.by}: {control.reason}"


def _utc(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at_ms / 1000))


def announce_again(rule: str, open_incidents: Sequence[Incident], *,
                   limit: int = 10) -> tuple[str, str]:
    """The message when a rule's mute (or disable) ends and some of its incidents are still
    open and unacknowledged: nothing about them was announced meanwhile (title, body)."""
    lines = [f"- #{i.id} {i.gateway}/{i.device}: {i.summary} (since {_utc(i.triggered_ms)})"
             for i in open_incidents[:limit]]
    more = len(open_incidents) - limit
    if more > 0:
        lines.append(f"- and {more} more: careflow incidents list")
    return (f"{rule} is announced again: {len(open_incidents)} incident(s) still open",
            f"The rule {rule} was muted or disabled, so these were not announced. Still open "
            "and unacknowledged:\n" + "\n".join(lines))


def silence_refusal(*, gateway: str, rule: str, severities: Mapping[str, str]) -> str | None:
    """Why a silence is refused (None: it may be added): one that covers a critical rule (or a
    care alarm, or the hub's own alerts) must name one gateway, without a pattern; a silence
    across gateways would hide every home's emergency."""
    if not _PATTERN_CHARS.isdisjoint(gateway):
        never = sorted({*ALWAYS_ANNOUNCED, *SELF_RULES, *(
            name for name, severity in severities.items() if severity == "critical")})
        covered = [name for name in never if fnmatch.fnmatchcase(name, rule)]
        if covered:
            more = len(covered) - 3
            what = ", ".join(covered[:3]) + (f" and {more} more" if more > 0 else "")
            return (f"a silence of rule {rule!r} across gateways ({gateway!r}) would hide "
                    f"{what} everywhere: name one gateway (-g gw-0042), or narrow -r to "
                    "rules that are not critical (`careflow rules list` shows them)")
    return None
