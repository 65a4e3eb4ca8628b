"""The console's browser sessions: a key signs in once, the browser then holds only a session cookie.

Sign-in (`POST /console/api/session`) checks the key and keeps it here, in this process's memory, under
a random session id. The browser gets that id in an HttpOnly, SameSite=Strict cookie (so page scripts
cannot read it and other sites' pages cannot send it) for SESSION_SECONDS, and a CSRF token in the
sign-in answer. The key itself is never in a URL, a cookie, the page's storage or a log.

SessionMiddleware turns a session back into the key for the API the console calls (/v1/..., /admin/...,
/console/api/...): a request with the cookie and no Authorization header of its own gets
`Authorization: Bearer <key>` added, but only with a matching `X-CSRF-Token` header (and, for a change,
an Origin of this host when the browser sends one); otherwise 403. Everything after that is the API as
a client with that key sees it: the key is checked on every request, so a revoked key's session stops
working at once, and an account's key sees its own account only.

Sessions live in the process that signed the browser in: behind several replicas, keep a browser on
one replica (sticky sessions) or it is asked to sign in again.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie

from llmaas.errors import LlmaasError
from llmaas.server.errors import error_response

COOKIE = "llmaas_console"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 3600  # a session lasts an hour from sign-in, then the key is asked for again
MAX_SESSIONS = 10_000  # per process; past it the oldest session goes first
# Where a session stands in for a key: the APIs the console's scripts call.
API_PREFIXES = ("/v1/", "/admin/", "/console/api/")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class Session:
    id: str = field(repr=False)
    csrf_token: str = field(repr=False)
    secret: str | None = field(repr=False)  # the key; None in --no-auth mode (no key to pass on)
    account: str
    is_admin: bool
    expires_at: float  # time.monotonic()


class SessionStore:
    """Sessions by id, each for `ttl_s` seconds from sign-in; at most `max_sessions` (oldest go first)."""

    def __init__(
        self, ttl_s: float = SESSION_SECONDS, max_sessions: int = MAX_SESSIONS, clock=time.monotonic
    ):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}  # insertion order: oldest first

    def open(self, secret: str | None, account: str, is_admin: bool) -> Session:
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf_token=secrets.token_urlsafe(32),
            secret=secret,
            account=account,
            is_admin=is_admin,
            expires_at=self._clock() + self.ttl_s,
        )
        with self._lock:
            now = self._clock()
            for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
                del self._sessions[sid]
            while len(self._sessions) >= self.max_sessions:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            self.close(session_id)
            return None
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def session_id_from(scope) -> str | None:
    raw = header(scope, b"cookie")
    if not raw:
        return None
    cookies = SimpleCookie()
    try:
        cookies.load(raw)
    except Exception:  # a malformed Cookie header is no session, not a 500
        return None
    morsel = cookies.get(COOKIE)
    return morsel.value if morsel is not None else None


def same_origin(scope) -> bool:
    """True unless the browser names another site as the request's Origin."""
    origin = header(scope, b"origin")
    if origin is None:
        return True
    host = header(scope, b"host") or ""
    return origin.split("://", 1)[-1] == host


def cookie_header(session: Session | None, secure: bool) -> str:
    """Set-Cookie for a new session, or one that clears it (None)."""
    value, age = (session.id, SESSION_SECONDS) if session is not None else ("", 0)
    flags = "; Secure" if secure else ""
    return f"{COOKIE}={value}; Max-Age={age}; Path=/; HttpOnly; SameSite=Strict{flags}"


class CsrfError(LlmaasError):
    """A console request without its session's CSRF token, or from another site -> 403."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "csrf_failed"


def check_csrf(scope, session: Session) -> None:
    given = header(scope, CSRF_HEADER.encode()) or ""
    if not hmac.compare_digest(given.encode(), session.csrf_token.encode()):
        raise CsrfError(f"A console request needs its session's '{CSRF_HEADER}' header.", CSRF_HEADER)
    check_origin(scope)


def check_origin(scope) -> None:
    if scope["method"] not in SAFE_METHODS and not same_origin(scope):
        raise CsrfError("A console request from another site is refused.", "origin")


class SessionMiddleware:
    """Pure ASGI, outside BillingMiddleware: adds the session's key as the bearer (see the module doc)."""

    def __init__(self, app, store: SessionStore):
        self.app, self.store = app, store

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIXES):
            return await self.app(scope, receive, send)
        if header(scope, b"authorization") is not None:  # an API client's own key: the session is not used
            return await self.app(scope, receive, send)
        session = self.store.get(session_id_from(scope))
        if session is None or scope["path"] == "/console/api/session":  # sign-in reads its own cookie
            return await self.app(scope, receive, send)
        try:
            check_csrf(scope, session)
        except CsrfError as exc:
            return await error_response(exc)(scope, receive, send)
        if session.secret is not None:
            bearer = (b"authorization", b"Bearer " + session.secret.encode("latin-1"))
            scope = {**scope, "headers": [*scope["headers"], bearer]}
        await self.app(scope, receive, send)
