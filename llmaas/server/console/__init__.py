"""The web console: a customer's balance, usage, keys and playground; the operator's accounts, prices,
margin and engine status. Pages and scripts ship in this package (static/); see docs/console.md."""

from __future__ import annotations

from fastapi import FastAPI

from llmaas.server.console import account_api, operator_api, pages
from llmaas.server.console.machine_costs import MachineCosts
from llmaas.server.console.sessions import SessionMiddleware, SessionStore


def install_console(app: FastAPI, machine_costs: MachineCosts | None = None) -> None:
    """The console's routes, and its session middleware: call it right after BillingMiddleware is added,
    so that the session's key reaches billing as the request's bearer."""
    store = SessionStore()
    app.state.console_sessions = store
    app.state.console_machine_costs = machine_costs or MachineCosts()
    app.include_router(account_api.router(store))
    app.include_router(operator_api.router(lambda: app.state.console_machine_costs))
    app.include_router(pages.router(store))
    app.add_middleware(SessionMiddleware, store=store)


__all__ = ["MachineCosts", "install_console"]
