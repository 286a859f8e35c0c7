"""The pages of the one-tap links: ``GET /l/{token}`` shows what the link will do, only the
``POST`` from that page does it.

Mail scanners and chat previews fetch every link in a message, so a GET reads and changes
nothing. The POST needs the page's CSRF field (an HMAC of the token: only a page the hub
rendered for this link has it), then spends the link, changes the incident and records who did
it in the incident's timeline, in one transaction: a link refused for any reason (forged,
expired, used, the incident already acknowledged) changes nothing and says why.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jinja2 import Environment
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from careflow.core.errors import RefusedError
from careflow.hub.alerting.notify import silenceable
from careflow.hub.store.interface import Store
from careflow.hub.store.records import Incident, IncidentAction, IncidentState
from careflow.hub.web.links import (
    LinkAction,
    LinkClaim,
    Refusal,
    csrf_ok,
    csrf_token,
    verify,
)

if TYPE_CHECKING:
    from careflow.hub.web.app import WebDeps

__all__ = ["SILENCE_MS", "LinkOutcome", "act", "routes"]

SILENCE_MS = 2 * 3600 * 1000  # what a "Silence 2 h" link silences for
MAX_FORM = 4096  # bytes of a link page's POST: two short fields
MAX_NAME = 60
HEADERS = {
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",  # the token is in the URL: never hand it on
    "X-Frame-Options": "DENY",  # no page of another site can frame the button
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'",
}
_VERB = {LinkAction.ACKNOWLEDGE: "Acknowledge", LinkAction.RESOLVE: "Resolve",
         LinkAction.SILENCE: "Silence for 2 hours"}
_DONE = {LinkAction.ACKNOWLEDGE: "Acknowledged", LinkAction.RESOLVE: "Resolved",
         LinkAction.SILENCE: "Silenced"}
_REFUSED = {  # (HTTP status, heading, what to do)
    Refusal.MALFORMED: (403, "This link is not valid",
                        "It may have been cut short or changed on the way: open the whole link "
                        "from the message again, or use the console. Nothing was changed."),
    Refusal.FORGED: (403, "This link is not valid",
                     "It may have been cut short or changed on the way: open the whole link "
                     "from the message again, or use the console. Nothing was changed."),
    Refusal.EXPIRED: (410, "This link has expired",
                      "Links in messages work for a limited time: use the console, or "
                      "`careflow incidents` on the hub. Nothing was changed."),
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_SEEN = re.compile(r"[1-9][0-9]{0,8}")


@dataclass(frozen=True, slots=True)
class LinkOutcome:
    """What a link's POST did: the incident after it, or why nothing (``status``: HTTP)."""

    status: int
    heading: str
    message: str
    incident: Incident | None = None


def _utc(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at_ms / 1000))


def _pattern(name: str) -> str:
    """A name as a silence pattern matching only itself (silences match shell-style)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def typed_name(given: str, channel: str) -> str:
    """Who used the link: the name typed on its page (cleaned, capped), else the channel's.

    Invisible formatting characters go too: a right-to-left override or a zero-width space
    makes one name read as, or look like, another's wherever it is shown."""
    visible = "".join(c for c in _CONTROL.sub(" ", given)
                      if unicodedata.category(c) not in ("Cf", "Cs"))
    name = " ".join(visible.split())[:MAX_NAME].strip()
    return name or channel


def _state_refusal(incident: Incident, action: LinkAction) -> LinkOutcome | None:
    """Why ``action`` cannot be done on ``incident`` as it is now (None: it can)."""
    if action == LinkAction.SILENCE and not silenceable(incident):
        return LinkOutcome(403, "A care alarm cannot be silenced from a link",
                           "A silence would stop its escalation with no one having it, and "
                           "hide the next alarm of this device. Acknowledge it if you take it; "
                           "a silence for maintenance is set on the hub (`careflow silences "
                           "add`). Nothing was changed.", incident)
    if incident.state == IncidentState.RESOLVED and action != LinkAction.SILENCE:
        return LinkOutcome(409, f"Incident {incident.id} is already resolved",
                           f"Resolved by {incident.resolved_by or 'someone'} at "
                           f"{_utc(incident.resolved_ms or 0)}. Nothing was changed.", incident)
    if incident.state == IncidentState.ACKNOWLEDGED and action == LinkAction.ACKNOWLEDGE:
        return LinkOutcome(409, f"Incident {incident.id} is already acknowledged",
                           f"{incident.acknowledged_by or 'Someone'} has it (acknowledged at "
                           f"{_utc(incident.acknowledged_ms or 0)}). Nothing was changed.",
                           incident)
    return None


def _refusal(store: Store, incident: Incident, action: LinkAction) -> LinkOutcome | None:
    """Why ``action`` cannot be done on ``incident`` now (None: it can): a resolved one that a
    newer incident of its rule and source follows says so first (it was raised again, and
    that is not over)."""
    refusal = _state_refusal(incident, action)
    if incident.state != IncidentState.RESOLVED:
        return refusal
    newer = store.unresolved_incident(rule=incident.rule, gateway=incident.gateway,
                                      device=incident.device)
    if newer is None or newer.id <= incident.id:
        return refusal
    return LinkOutcome(409, f"Incident {incident.id} was raised again",
                       f"A new alarm of {incident.gateway} / {incident.device} came after it: "
                       f"incident {newer.id} is {newer.state}"
                       f"{f' (by {newer.acknowledged_by})' if newer.acknowledged_by else ''}. "
                       "This link is for the earlier one: use the links of the newest message "
                       "about it, or the console. Nothing was changed.", incident)


def _spent(at_ms: int, incident: Incident | None) -> LinkOutcome:
    return LinkOutcome(410, "This link was already used",
                       f"It was used at {_utc(at_ms)}; each link works once. Nothing was "
                       "changed.", incident)


def preview(store: Store, claim: LinkClaim) -> LinkOutcome:
    """What the link's page shows before anything is done (reads only)."""
    incident = store.incident(claim.incident_id)
    if incident is None:
        return LinkOutcome(404, "No such incident",
                           f"There is no incident {claim.incident_id} on this hub.")
    spent = store.link_spent(claim.link_id)
    if spent is not None:
        return _spent(spent, incident)
    return _refusal(store, incident, claim.action) or LinkOutcome(200, "", "", incident)


class _RefusedError(Exception):
    """Rolls the unit of work back and carries the page to show."""

    def __init__(self, outcome: LinkOutcome) -> None:
        super().__init__(outcome.heading)
        self.outcome = outcome


def _raised_since(incident: Incident, seen_raises: int) -> LinkOutcome | None:
    """Why the page's button may not act: the alarm was raised again after the page showed
    it (a new emergency the person has not seen; acting would cover it unseen)."""
    if incident.raises == seen_raises:
        return None
    return LinkOutcome(409, f"Incident {incident.id} was raised again",
                       f"It was raised again at {_utc(incident.last_raised_ms or 0)} "
                       f"({incident.raises} times now) after this page was opened: a new alarm. "
                       "Look at it again below; open the link again to act on it. Nothing was "
                       "changed.", incident)


def act(store: Store, claim: LinkClaim, *, by: str, now_ms: int,
        seen_raises: int | None = None) -> LinkOutcome:
    """Spend the link, do its action and record it in the incident's timeline, all in one
    transaction; a refusal (used, incident gone or already in that state, or raised again since
    its page showed ``seen_raises`` raises) changes nothing."""
    try:
        with store.atomically("act on a one-tap link"):
            incident = store.incident(claim.incident_id)
            if incident is None:
                raise _RefusedError(preview(store, claim))
            refusal = _refusal(store, incident, claim.action) or (
                None if seen_raises is None else _raised_since(incident, seen_raises))
            if refusal is not None:
                raise _RefusedError(refusal)
            if not store.spend_link(claim.link_id, incident_id=incident.id,
                                    action=claim.action, channel=claim.channel, at_ms=now_ms):
                raise _RefusedError(_spent(store.link_spent(claim.link_id) or now_ms, incident))
            detail = f"link {claim.link_id} sent to {claim.channel}"
            message = _apply(store, incident, claim.action, by=by, now_ms=now_ms,
                             detail=detail)
            store.record_action(incident.id, at_ms=now_ms, action=claim.action, by=by,
                                via="link", detail=detail)
    except _RefusedError as refused:
        return refused.outcome
    except RefusedError as exc:  # changed by someone else between the read and the write
        return LinkOutcome(409, "Nothing was changed", str(exc))
    return LinkOutcome(200, f"{_DONE[claim.action]}: incident {incident.id}", message,
                       store.incident(incident.id))


def _apply(store: Store, incident: Incident, action: LinkAction, *, by: str, now_ms: int,
           detail: str) -> str:
    """Do ``action``; what the person is told it did."""
    if action == LinkAction.ACKNOWLEDGE:
        store.acknowledge_incident(incident.id, by=by, at_ms=now_ms)
        return f"You have it, {by}: escalation stops and no one else is called for it."
    if action == LinkAction.RESOLVE:
        store.resolve_incident(incident.id, by=by, at_ms=now_ms)
        return f"Closed by {by}. If it happens again, a new incident is opened."
    until = now_ms + SILENCE_MS
    store.add_silence(gateway=_pattern(incident.gateway), device=_pattern(incident.device),
                      rule=_pattern(incident.rule), starts_ms=now_ms, ends_ms=until,
                      created_by=by, comment=f"{detail}, from incident {incident.id}")
    return (f"Nothing more of {incident.rule} for {incident.gateway} / {incident.device} is "
            f"announced until {_utc(until)}.")


def routes(deps: WebDeps) -> list[BaseRoute]:
    """``/l/{token}``: GET shows, POST acts."""
    from careflow.hub.web.app import templates  # noqa: PLC0415 (app imports this module)

    env = templates()

    async def link_page(request: Request) -> Response:
        token = request.path_params["token"]
        claim = verify(deps.link_key, token, now_ms=deps.now_ms())
        if isinstance(claim, Refusal):
            status, heading, message = _REFUSED[claim]
            return _page(env, "link_refused.html", status, heading=heading, message=message)
        if request.method == "POST":
            return await _post(request, deps, env, token, claim)
        outcome, timeline = await deps.call(lambda: _with_timeline(deps.store, claim,
                                                                   preview(deps.store, claim)))
        if outcome.status != 200:
            return _refused(env, outcome, deps.now_ms(), timeline)
        assert outcome.incident is not None
        return _page(env, "link_confirm.html", 200,
                     **_about(outcome.incident, deps.now_ms(), timeline),
                     action=claim.action, channel=claim.channel,
                     csrf=csrf_token(deps.link_key, token), verb=_VERB[claim.action])

    return [Route("/l/{token}", link_page, methods=["GET", "POST"])]


async def _post(request: Request, deps: WebDeps, env: Environment, token: str,
                claim: LinkClaim) -> Response:
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > MAX_FORM:  # a browser's form always says
        return _page(env, "link_refused.html", 413, heading="Too much sent",
                     message="Open the link again and press the button.")
    form = await request.form(max_files=0, max_fields=8)
    given = form.get("csrf")
    seen = form.get("seen")  # the raises the page showed
    if not isinstance(given, str) or not csrf_ok(deps.link_key, token, given) or not (
            isinstance(seen, str) and _SEEN.fullmatch(seen)):
        return _page(env, "link_refused.html", 403, heading="Please confirm on the link's page",
                     message="This request did not come from the page of this link. Open "
                             "the link again and press the button there. Nothing was changed.")
    name = form.get("name")
    by = typed_name(name if isinstance(name, str) else "", claim.channel)
    now_ms = deps.now_ms()
    outcome, timeline = await deps.call(lambda: _with_timeline(
        deps.store, claim, act(deps.store, claim, by=by, now_ms=now_ms, seen_raises=int(seen))))
    if outcome.status != 200:
        return _refused(env, outcome, now_ms, timeline)
    deps.wake_sender()
    assert outcome.incident is not None
    return _page(env, "link_done.html", 200, heading=outcome.heading, message=outcome.message,
                 **_about(outcome.incident, now_ms, timeline))


def _with_timeline(store: Store, claim: LinkClaim,
                   outcome: LinkOutcome) -> tuple[LinkOutcome, list[IncidentAction]]:
    """``outcome`` and its incident's timeline, read in the same store call (one turn of the
    web's connection per page, not two)."""
    return outcome, store.incident_actions(claim.incident_id)


def _about(incident: Incident, now_ms: int, timeline: list[IncidentAction]) -> dict[str, Any]:
    """What a link's pages say about its incident."""
    minutes = max(0, (now_ms - incident.triggered_ms) // 60_000)
    ago = ("just now" if minutes < 1 else f"{minutes} min ago" if minutes < 120
           else f"{minutes // 60} h ago")
    raised = (f"raised {incident.raises} times, last at {_utc(incident.last_raised_ms or 0)}"
              if incident.raises > 1 else "")
    return {"incident": incident, "since": f"{_utc(incident.triggered_ms)} ({ago})",
            "raised": raised,
            "silence_until": _utc(now_ms + SILENCE_MS),
            "timeline": [(_utc(a.at_ms), a) for a in timeline]}


def _refused(env: Environment, outcome: LinkOutcome, now_ms: int,
             timeline: list[IncidentAction]) -> Response:
    about = _about(outcome.incident, now_ms, timeline) if outcome.incident else {}
    return _page(env, "link_refused.html", outcome.status, heading=outcome.heading,
                 message=outcome.message, **about)


def _page(env: Environment, name: str, status: int, **context: object) -> Response:
    html = env.get_template(name).render(home_url="#", **context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


