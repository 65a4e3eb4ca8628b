"""The console's pages and static files, served from the package (no CDN, no build step).

Each page is static/shell.html around static/pages/<page>.html, with its script static/pages/<page>.js
(an ES module: no inline script, so the Content-Security-Policy allows scripts from this origin only).
A page asks for a session of the right kind before it is sent: none -> the sign-in page; a customer
at an operator page -> 403.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from llmaas.server.console.sessions import Session, SessionStore, session_id_from

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


@dataclass(frozen=True)
class Page:
    path: str  # under /console/
    title: str
    role: str  # "anyone" (sign-in), "customer" or "admin"


PAGES = [
    Page("", "Sign in", "anyone"),
    Page("overview", "Balance and plan", "customer"),
    Page("usage", "Usage and spend", "customer"),
    Page("keys", "API keys", "customer"),
    Page("playground", "Playground", "customer"),
    Page("admin/accounts", "Accounts", "admin"),
    Page("admin/prices", "Prices", "admin"),
    Page("admin/margin", "Revenue and margin", "admin"),
    Page("admin/engine", "Engine status", "admin"),
]
_BY_PATH = {p.path: p for p in PAGES}
HOME = {"customer": "overview", "admin": "admin/accounts"}


def _load_static() -> dict[str, bytes]:
    """Every file under static/, by its path there, read once at import."""
    root = resources.files(__package__) / "static"
    files: dict[str, bytes] = {}

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, prefix + entry.name + "/")
            elif any(entry.name.endswith(suffix) for suffix in _TYPES):
                files[prefix + entry.name] = entry.read_bytes()

    walk(root, "")
    return files


STATIC = _load_static()


def _nav(session: Session | None, current: Page) -> str:
    if session is None:
        return ""
    role = "admin" if session.is_admin else "customer"
    links = []
    for page in PAGES:
        if page.role != role:
            continue
        here = ' aria-current="page"' if page is current else ""
        links.append(f'<a href="/console/{page.path}"{here}>{html.escape(page.title)}</a>')
    who = f"{'operator' if session.is_admin else 'account'} {session.account}"
    return (
        f'<nav aria-label="Console">{"".join(links)}</nav>'
        f'<div class="who"><span>{html.escape(who)}</span>'
        '<button type="button" id="sign-out">Sign out</button></div>'
    )


def render(page: Page, session: Session | None, name: str | None = None) -> str:
    """The page's HTML; `name` picks another body and script (the refusal) under the page's nav."""
    name = name or page.path or "signin"
    shell = STATIC["shell.html"].decode()
    return (
        shell.replace("{title}", html.escape(page.title))
        .replace("{nav}", _nav(session, page))
        .replace("{script}", f"/console/static/pages/{name}.js")
        .replace("{body}", STATIC[f"pages/{name}.html"].decode())
    )


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers={**SECURITY_HEADERS, "cache-control": "no-store"})


def router(store: SessionStore) -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    @pages.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/console/", status_code=307)

    @pages.get("/console")
    async def console_root() -> RedirectResponse:
        return RedirectResponse("/console/", status_code=307)

    @pages.get("/console/static/{path:path}")
    async def static(path: str) -> Response:
        body = STATIC.get(path)
        if body is None:
            return _html("<!doctype html><title>Not found</title><p>Not found.</p>", 404)
        kind = _TYPES[path[path.rindex(".") :]]
        headers = {**SECURITY_HEADERS, "cache-control": "no-cache"}
        return Response(body, media_type=f"{kind}; charset=utf-8", headers=headers)

    @pages.get("/console/{path:path}")
    async def page(path: str, request: Request) -> Response:
        page = _BY_PATH.get(path.strip("/"))
        if page is None:
            return _html("<!doctype html><title>Not found</title><p>No such console page.</p>", 404)
        session = store.get(session_id_from(request.scope))
        role = None if session is None else "admin" if session.is_admin else "customer"
        if page.role == "anyone":
            return _html(render(page, session))
        if role is None:
            return RedirectResponse(f"/console/?next={page.path}", status_code=303)
        if page.role == "admin" and role != "admin":
            return _html(render(Page(page.path, "Operators only", "admin"), session, "refused"), 403)
        if page.role != role:  # the operator's key runs no inference: their pages are the admin ones
            return RedirectResponse(f"/console/{HOME[role]}", status_code=303)
        return _html(render(page, session))

    return pages
