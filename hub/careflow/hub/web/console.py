"""The on-call console: log in, the fleet now, incidents with their timeline and the
acknowledge/resolve buttons, a device, dead letters, the hub's health.

Server-rendered (Jinja2, autoescaped: everything shown may come from a device), no JavaScript.
Every page needs a login (:mod:`careflow.hub.web.auth`) but ``/login``; a GET without one is sent
to the login page, a POST is refused (403). Every POST carries the CSRF token of its form, and
only operators change incidents. Store work runs through :meth:`WebDeps.call`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from careflow.core.errors import RefusedError
from careflow.hub.fleet.sites import SiteBook
from careflow.hub.store.records import (
    UNRESOLVED,
    DeadLetter,
    DeviceRecord,
    EventFilter,
    Incident,
    IncidentState,
    NotificationState,
    User,
)
from careflow.hub.web import auth, views
from careflow.hub.web.auth import CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, Principal

if TYPE_CHECKING:
    from careflow.hub.web.app import WebDeps

__all__ = ["PUBLIC_PATHS", "routes"]

log = logging.getLogger(__name__)

# Reachable without a login (a test enumerates the app's routes against this); the one-tap
# link pages under /l/ check their own signatures.
PUBLIC_PATHS = frozenset({"/login", "/healthz", "/readyz", "/metrics"})
PUBLIC_PREFIXES = ("/l/",)

# No script at all, styles only inline (base.html), forms only to ourselves, never framed.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ACTIONS = {"acknowledge": "acknowledged", "resolve": "resolved"}
_LIST_STATES: dict[str, tuple[str, ...] | None] = {
    "active": UNRESOLVED, "open": (IncidentState.OPEN,), "resolved": (IncidentState.RESOLVED,),
    "all": None}
_MAX_FORM = 4096  # a console form is a few short fields
_MAX_BODY = 16 * 1024  # ...so a longer body is refused before it is read
_HASHING_AT_ONCE = 2
_MAX_HASHING_WAITING = 16
_HASHING_PER_CLIENT = 2  # of those, from one client address (an IPv6 /64)
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_SITE_SCAN = 50_000  # events of the log one store call looks through for provisions
_MAX_ID = 2**63 - 1  # an incident id is a SQLite integer
_SEEN = re.compile(r"[1-9][0-9]{0,8}")  # the raises an incident page showed

Handler = Callable[[Request, Principal], Awaitable[Response]]


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of ours, never another site (``//evil``)."""
    if (not target or not target.startswith("/") or target.startswith("//") or "\\" in target
            or any(ord(char) <= 0x20 or ord(char) == 0x7F for char in target)):
        return "/"  # browsers drop tabs and newlines: "/\t/evil" would be "//evil"
    if target.split("?", 1)[0].rstrip("/") in ("/login", "/logout"):
        return "/"  # signed in already: /login would send there again, and again
    return target


def _too_long(request: Request) -> bool:
    """A body longer than any console form (or of a length it does not declare)."""
    try:
        return int(request.headers.get("content-length", "")) > _MAX_BODY
    except ValueError:
        return True


def _address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why a request has no principal: a page to show instead (status, title, message)."""

    status: int
    title: str
    message: str


class _Console:
    """The console's handlers over one :class:`WebDeps`."""

    def __init__(self, deps: WebDeps) -> None:
        from careflow.hub.web.app import templates  # noqa: PLC0415 (app imports this module)

        self.deps = deps
        self.store = deps.store
        self.limiter = auth.LoginLimiter()
        # Argon2 takes 64 MiB and a core per check: a flood of logins must neither exhaust the
        # hub's memory nor hold its cores, so checks run a few at a time, and few may wait.
        self._hashing: anyio.CapacityLimiter | None = None  # made in the event loop
        self._hashing_waiting = 0
        self._hashing_by_client: dict[str, int] = {}  # checks in hand per client (network)
        # each gateway's site, learnt from the log's provision events up to _sites_pos
        self._sites = SiteBook()
        self._sites_pos = 0
        self.env = templates()
        self.env.filters["when"] = views.format_when
        self.env.filters["visible"] = views.visible
        self.env.globals["ago"] = lambda ms: views.format_age(ms, now_ms=self.deps.now_ms())

    # -- rendering ---------------------------------------------------------------------------

    def render(self, template: str, *, status: int = 200, viewer: Principal | None = None,
               headers: Mapping[str, str] | None = None, **context: object) -> HTMLResponse:
        """A page, with the headers every console page has."""
        html = self.env.get_template(template).render(
            viewer=viewer, csrf=viewer.csrf if viewer is not None else "",
            header_mode=self.deps.settings.auth_header is not None, **context)
        return HTMLResponse(html, status_code=status, headers={**_HEADERS, **(headers or {})})

    def notice(self, refusal: _Refusal, viewer: Principal | None = None) -> HTMLResponse:
        """A page that only says something (refused, not found, try later)."""
        return self.render("notice.html", status=refusal.status, viewer=viewer,
                           title=refusal.title, message=refusal.message)

    def _cookie_flags(self, request: Request) -> dict[str, Any]:
        return auth.cookie_flags(self.deps.settings, request.url.scheme)

    # -- who is asking -------------------------------------------------------------------------

    async def principal(self, request: Request) -> Principal | _Refusal | None:
        """The signed-in user (None: nobody; a refusal: the proxy named someone we refuse)."""
        header = self.deps.settings.auth_header
        if header is not None:
            return await self._proxy_principal(request, header)
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        session = await self.deps.call(functools.partial(
            self.store.session, auth.token_hash(token), now_ms=self.deps.now_ms()))
        if session is None:
            return None
        return Principal(session.user, session.role, session.csrf, "session")

    async def _proxy_principal(self, request: Request, header: str) -> Principal | _Refusal:
        """The user the trusted proxy names in ``header`` (or why not)."""
        named = request.headers.getlist(header)
        if len(named) > 1:  # the proxy's and one the client sent: which is whose?
            return _Refusal(400, "Not signed in",
                            f"The request named its user more than once (header {header}). "
                            "The sign-in proxy must set that header itself, replacing any "
                            "the browser sent.")
        name = named[0].strip() if named else ""
        if not name:
            return _Refusal(401, "Not signed in",
                            f"The sign-in proxy did not name a user (header {header}). "
                            "Open the console through the proxy's address.")
        user = await self.deps.call(functools.partial(self.store.user, name))
        if user is None:
            return _Refusal(403, "Not a careflow user",
                            f"You are signed in as {name}, who is not a careflow user. An "
                            f"administrator can add you: careflow users add {name} "
                            "--role viewer --sso")
        return Principal(user.name, user.role, auth.header_csrf(self.deps.link_key, name),
                         "header")

    def page(self, handler: Handler, *, operator: bool = False) -> Callable[[Request],
                                                                              Awaitable[Response]]:
        """``handler`` behind the login; for a POST, behind the form's CSRF token too (and the
        operator role, when ``operator``)."""

        async def endpoint(request: Request) -> Response:
            who = await self.principal(request)
            if isinstance(who, _Refusal):
                return self.notice(who)
            if request.method == "POST":
                refusal = await self._post_refusal(request, who, operator=operator)
                if refusal is not None:
                    return self.notice(refusal, who)
            elif who is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target, safe='')}", 303,
                                        headers=_HEADERS)
            assert who is not None
            return await handler(request, who)

        return endpoint

    async def _post_refusal(self, request: Request, who: Principal | None, *,
                            operator: bool) -> _Refusal | None:
        """Why a POST is refused (None: it may go on): too long, nobody signed in, not the
        form's CSRF token, or a viewer asking for an operator's change."""
        if _too_long(request):
            return _Refusal(413, "Refused: too long", "A console form is a few short fields.")
        if who is None:
            return _Refusal(403, "Not signed in", "Log in first, then try again.")
        form = await request.form(max_fields=20, max_part_size=_MAX_FORM)
        given = form.get(CSRF_FIELD)
        if not auth.csrf_matches(who.csrf, given if isinstance(given, str) else None):
            return _Refusal(403, "Refused: the form has expired",
                            "This form is not from your current login. Go back, reload the "
                            "page and try again.")
        if operator and not who.may_act:
            return _Refusal(403, "Refused: viewers cannot change incidents",
                            f"{who.user} is a viewer. An operator can acknowledge and resolve; "
                            "an administrator can change your role with careflow users add "
                            "--replace.")
        return None

    # -- login and logout ----------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        """GET: the form (or straight on when signed in); POST: check it, start a session."""
        who = await self.principal(request)
        target = _safe_next(request.query_params.get("next"))
        if isinstance(who, _Refusal):
            return self.notice(who)
        if self.deps.settings.auth_header is not None or (who is not None
                                                         and request.method == "GET"):
            return RedirectResponse(target, 303, headers=_HEADERS)
        if request.method == "GET":
            return self._login_form(request, target=target)
        return await self._check_login(request)

    async def _check_login(self, request: Request) -> Response:
        """A submitted login form: its CSRF token, the limiter, then the password."""
        if _too_long(request):
            return self.notice(_Refusal(413, "Refused: too long",
                                        "A login form is a name and a password."))
        form = await request.form(max_fields=20, max_part_size=_MAX_FORM)
        name, password, given = (str(form.get(key) or "") for key in ("name", "password",
                                                                     CSRF_FIELD))
        target = _safe_next(str(form.get("next") or "") or None)
        if not auth.csrf_matches(request.cookies.get(LOGIN_COOKIE), given):
            return self._login_form(request, target=target, name=name, status=403,
                                    error="The login form had expired. Please try again.")
        address, now = _address(request), self.deps.now_ms()
        retry = self.limiter.retry_at(name, address, now_ms=now)
        if retry is not None:
            wait_s = max(1, -(-(retry - now) // 1000))
            return self.render(
                "login.html", status=429, headers={"Retry-After": str(wait_s)},
                login_csrf=given, next=target, name=name,
                error=f"Too many failed logins for {name or 'this name'} from your address. "
                      f"Try again at {views.format_when(retry)} (in {-(-wait_s // 60)} "
                      "min), or ask an administrator to check the name.")
        user = await self.deps.call(functools.partial(self.store.user, name)) \
            if auth.valid_user_name(name) else None
        client = auth.client_network(address)
        in_hand = self._hashing_by_client.get(client, 0)
        if self._hashing_waiting >= _MAX_HASHING_WAITING or in_hand >= _HASHING_PER_CLIENT:
            # one client cannot fill the queue on its own and keep everyone else out
            return self.render("login.html", status=503, headers={"Retry-After": "5"},
                               login_csrf=given, next=target, name=name,
                               error="Too many logins at once. Please try again in a moment.")
        self._hashing_waiting += 1
        self._hashing_by_client[client] = in_hand + 1
        try:
            if self._hashing is None:
                self._hashing = anyio.CapacityLimiter(_HASHING_AT_ONCE)
            ok, rehash = await anyio.to_thread.run_sync(auth.check_password, user, password,
                                                        limiter=self._hashing)
        finally:
            self._hashing_waiting -= 1
            left = self._hashing_by_client.pop(client) - 1
            if left:
                self._hashing_by_client[client] = left
        if not ok or user is None:
            self.limiter.failed(name, address, now_ms=now)
            return self._login_form(request, target=target, name=name, status=401,
                                    error="Wrong name or password.")
        self.limiter.succeeded(name, address)
        return await self._start_session(request, user, rehash, target)

    def _login_form(self, request: Request, *, target: str, name: str = "", status: int = 200,
                    error: str | None = None) -> Response:
        token = request.cookies.get(LOGIN_COOKIE) or ""
        if len(token) < 32 or len(token) > 64:
            token = auth.new_token()
        response = self.render("login.html", status=status, login_csrf=token, next=target,
                               name=name, error=error)
        response.set_cookie(LOGIN_COOKIE, token, max_age=auth.LOGIN_COOKIE_TTL_S, path="/login",
                            **self._cookie_flags(request))
        return response

    async def _start_session(self, request: Request, user: User, rehash: str | None,
                             target: str) -> Response:
        token, csrf, now = auth.new_token(), auth.new_token(), self.deps.now_ms()
        old = request.cookies.get(SESSION_COOKIE)

        def start() -> bool:
            with self.store.atomically("start a console session"):
                now_user = self.store.user(user.name)
                if now_user is None or now_user.password_hash != user.password_hash:
                    # removed, or the password changed while this one was checked: a change
                    # ends every session, and must end one that was about to start too
                    return False
                if rehash is not None:  # stronger parameters than when it was set; the
                    # same password, so the user's other sessions go on (a replace ends them)
                    self.store.renew_password_hash(user.name, old=user.password_hash,
                                                   new=rehash)
                if old:
                    self.store.end_session(auth.token_hash(old))
                self.store.start_session(auth.token_hash(token), user=user.name, csrf=csrf,
                                         at_ms=now, expires_ms=now + auth.SESSION_TTL_MS)
                return True

        if not await self.deps.call(start):
            return self._login_form(request, target=target, name=user.name, status=401,
                                    error="Wrong name or password.")
        response = RedirectResponse(target, 303, headers=_HEADERS)
        response.set_cookie(SESSION_COOKIE, token, max_age=auth.SESSION_TTL_MS // 1000,
                            path="/", **self._cookie_flags(request))
        response.delete_cookie(LOGIN_COOKIE, path="/login", **self._cookie_flags(request))
        return response

    async def logout(self, request: Request, who: Principal) -> Response:
        """End the session (behind a proxy there is none of ours to end)."""
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            await self.deps.call(functools.partial(self.store.end_session,
                                                   auth.token_hash(token)))
        response = RedirectResponse("/login", 303, headers=_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/", **self._cookie_flags(request))
        del who
        return response

    # -- pages ---------------------------------------------------------------------------------

    async def _site_book(self) -> SiteBook:
        """Each gateway's site (:class:`SiteBook`'s rule), learnt from the provision events
        once and then from the new ones only, a bounded stretch of the log per store call.

        Reading every provision on each view scanned the whole event log (millions of rows, no
        index by type) while holding the web's store connection, which the one-tap links and
        every other page wait for."""
        def more() -> bool:
            last = self.store.last_pos()
            upto = min(last, self._sites_pos + _SITE_SCAN)
            for chunk in self.store.iter_log(EventFilter(type="provision"), up_to_pos=upto,
                                             after_pos=self._sites_pos):
                for event in chunk:
                    self._sites.learn(event, event.data)
            self._sites_pos = upto
            return upto < last

        while await self.deps.call(more):
            pass
        return self._sites

    async def fleet(self, request: Request, who: Principal) -> Response:
        """Every gateway and device by site, problems first."""
        now = self.deps.now_ms()
        book = await self._site_book()

        def read() -> tuple[list[views.SiteView], int]:
            return (views.fleet(self.store.devices(), now_ms=now, presence=self.store.presence(),
                                paused=self.store.paused(now), sites=book),
                    self.store.count_incidents(states=UNRESOLVED))

        sites, active = await self.deps.call(read)
        totals: dict[str, int] = {}
        for site in sites:
            for state, count in site.counts.items():
                totals[state] = totals.get(state, 0) + count
        del request
        return self.render("fleet.html", viewer=who, sites=sites, totals=totals,
                           active=active, order=[str(s) for s in views.STATE_ORDER])

    async def incidents(self, request: Request, who: Principal) -> Response:
        """Incidents, newest first: the active ones unless asked for others."""
        shown = request.query_params.get("state", "active")
        states = _LIST_STATES.get(shown, UNRESOLVED)
        shown = shown if shown in _LIST_STATES else "active"
        found = await self.deps.call(functools.partial(self.store.incidents, states=states,
                                                       limit=200))
        return self.render("incidents.html", viewer=who, incidents=found, shown=shown,
                           choices=list(_LIST_STATES))

    async def _incident_page(self, who: Principal, incident_id: int, *, status: int = 200,
                             error: str | None = None, done: str | None = None) -> Response:
        def read() -> tuple[Incident | None, list[views.TimelineEntry], Incident | None]:
            if incident_id > _MAX_ID:  # SQLite cannot even look for it
                return None, [], None
            incident = self.store.incident(incident_id)
            if incident is None:
                return None, [], None
            newer = None  # resolved, and its alarm raised again since: a new incident has it
            if incident.state == IncidentState.RESOLVED:
                newer = self.store.unresolved_incident(rule=incident.rule,
                                                       gateway=incident.gateway,
                                                       device=incident.device)
                newer = newer if newer is not None and newer.id > incident.id else None
            return (incident, views.timeline(incident, self.store.incident_actions(incident_id),
                                             self.store.incident_notifications(incident_id)),
                    newer)

        incident, entries, newer = await self.deps.call(read)
        if incident is None:
            return self.notice(_Refusal(404, "No such incident",
                                        f"There is no incident {incident_id}."), who)
        return self.render("incident.html", status=status, viewer=who, incident=incident,
                           timeline=entries, error=error, done=done, newer=newer)

    async def incident(self, request: Request, who: Principal) -> Response:
        """One incident, its timeline, and (for operators) what can be done."""
        done = request.query_params.get("done")
        return await self._incident_page(who, int(request.path_params["incident_id"]),
                                         done=done if done in _ACTIONS.values() else None)

    async def act(self, request: Request, who: Principal) -> Response:
        """Acknowledge or resolve, with its timeline entry, in one transaction."""
        incident_id = int(request.path_params["incident_id"])
        action = request.path_params["action"]
        if incident_id > _MAX_ID:
            return await self._incident_page(who, incident_id)
        if action not in _ACTIONS:
            return self.notice(_Refusal(404, "No such action",
                                        "An incident can be acknowledged or resolved."), who)
        seen = (await request.form(max_fields=20, max_part_size=_MAX_FORM)).get("seen")
        if not isinstance(seen, str) or not _SEEN.fullmatch(seen):
            return await self._incident_page(
                who, incident_id, status=409,
                error=f"Not {_ACTIONS[action]}: the form did not say which raise of the alarm "
                      "it showed. Look at the incident again below, then act.")
        now = self.deps.now_ms()

        def change() -> None:
            with self.store.atomically(f"{action} an incident from the console"):
                incident = self.store.incident(incident_id)
                if incident is not None and incident.raises != int(seen):
                    # a new emergency the person has not seen: acting would cover it unseen
                    msg = (f"it was raised again at {views.format_when(incident.last_raised_ms)}"
                           f" ({incident.raises} times now) after the page was shown: a new "
                           "alarm. Look at it again below, then act")
                    raise RefusedError(msg)
                if action == "acknowledge":
                    self.store.acknowledge_incident(incident_id, by=who.user, at_ms=now)
                else:
                    self.store.resolve_incident(incident_id, by=who.user, at_ms=now)
                self.store.record_action(incident_id, at_ms=now, action=action, by=who.user,
                                         via="console")

        try:
            await self.deps.call(change)
        except RefusedError as exc:
            return await self._incident_page(who, incident_id, status=409,
                                             error=f"Not {_ACTIONS[action]}: {exc}")
        self.deps.wake_sender()  # a resolve may have queued its message
        return RedirectResponse(f"/incidents/{incident_id}?done={_ACTIONS[action]}", 303,
                                headers=_HEADERS)

    async def device(self, request: Request, who: Principal) -> Response:
        """One gateway or device: its state now, its status history and last events."""
        gateway, device = request.path_params["gateway"], request.path_params["device"]
        now = self.deps.now_ms()
        sites = await self._site_book()

        def read() -> dict[str, Any] | None:
            record = self.store.device(gateway, device)
            if record is None:
                return None
            presence = self.store.presence()
            return {
                "record": record, "presence": presence.get(gateway),
                "row": views.device_row(record, now_ms=now, presence=presence,
                                        paused=self.store.paused(now), sites=sites),
                "statuses": self.store.query(EventFilter(gateway=gateway, device=device,
                                                         type="status"), limit=20),
                "events": self.store.query(EventFilter(gateway=gateway, device=device),
                                           limit=20),
                "incidents": self.store.incidents(states=UNRESOLVED, source=(gateway, device),
                                                  limit=100),
            }

        found = await self.deps.call(read)
        if found is None:
            return self.notice(_Refusal(404, "No such device",
                                        f"No device {gateway}/{device} has been heard from."),
                               who)
        record: DeviceRecord = found["record"]
        history = [{"at_ms": event.time_ms, "state": str(event.data.get("state", "-")),
                    "battery": views.battery(event.data),
                    "detail": views.compact_json({k: v for k, v in event.data.items()
                                                  if k not in ("state", "battery_pct")},
                                                 limit=120)}
                   for event in found["statuses"]]
        last = [{"at_ms": event.time_ms, "type": event.type,
                 "data": views.compact_json(event.data)} for event in found["events"]]
        facts = {key: views.compact_json(value, limit=120) if not isinstance(value, str)
                 else value for key, value in sorted(record.facts.items())}
        return self.render("device.html", viewer=who, record=record, row=found["row"],
                           presence=found["presence"], incidents=found["incidents"],
                           history=history, events=last, facts=facts)

    async def dead_letters(self, request: Request, who: Principal) -> Response:
        """Refused input, newest first, with its reason (payloads as escaped text previews)."""
        code = request.query_params.get("code") or None

        def read() -> tuple[list[DeadLetter], int]:
            return (self.store.dead_letters(limit=100, code=code),
                    self.store.dead_letter_count())

        letters, kept = await self.deps.call(read)
        rows = [{"letter": letter, "preview": views.payload_preview(letter)} for letter in letters]
        return self.render("deadletters.html", viewer=who, rows=rows, kept=kept, code=code)

    async def health(self, request: Request, who: Principal) -> Response:
        """The hub's own health, as /readyz and `careflow status` see it."""
        checks = dict(self.deps.readiness())
        report = dict(self.deps.health())

        def read() -> dict[str, Any]:
            return {
                "incidents_active": self.store.count_incidents(states=UNRESOLVED),
                "notifications_waiting": self.store.count_notifications(
                    states=(NotificationState.PENDING, NotificationState.SENDING)),
                "notifications_failed": self.store.count_notifications(
                    states=(NotificationState.FAILED,)),
                "failing_channels": self.store.failing_channels(),
                "dead_letters_kept": self.store.dead_letter_count(),
                "sequence_gaps": self.store.total_gaps(),
            }

        kept = await self.deps.call(read)
        del request
        return self.render("health.html", viewer=who, checks=checks,
                           ready=all(problem is None for problem in checks.values()),
                           report=report, kept=kept,
                           influx=report.get("influx") if isinstance(report.get("influx"), dict)
                           else None)


def routes(deps: WebDeps) -> list[BaseRoute]:
    """The console's routes: /login and /logout, then the pages behind the login."""
    listen = deps.settings.http_listen
    if deps.settings.auth_header is not None and listen is not None \
            and listen.host not in _LOOPBACK:
        # anyone who reaches the hub directly could name any user in the header
        log.warning("the console believes the header CAREFLOW_AUTH_HEADER names; listen only "
                    "where the proxy alone reaches the hub (CAREFLOW_HTTP_LISTEN=127.0.0.1:8080)",
                    extra={"header": deps.settings.auth_header, "listen": str(listen)})
    console = _Console(deps)
    page = console.page
    return [
        Route("/login", console.login, methods=["GET", "POST"]),
        Route("/logout", page(console.logout), methods=["POST"]),
        Route("/", page(console.fleet)),
        Route("/incidents", page(console.incidents)),
        Route("/incidents/{incident_id:int}", page(console.incident)),
        Route("/incidents/{incident_id:int}/{action:str}", page(console.act, operator=True),
              methods=["POST"]),
        Route("/devices/{gateway:str}/{device:str}", page(console.device)),
        Route("/deadletters", page(console.dead_letters)),
        Route("/health", page(console.health)),
    ]
