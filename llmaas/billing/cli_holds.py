"""Operator verbs for holds: `llmaas holds list|release`.

`holds list [--account A] [--all] [--limit N]`: the open holds (every hold with --all), newest first,
with their deadline, their owner's lease and their last progress checkpoint; `expired` marks an open
hold that any replica's next sweep will close. `holds release HOLD_OR_REQUEST_ID` closes one open hold
now; `holds release --expired` runs one sweep. A hold is closed as its expiry would close it: billed
`interrupted` at its last progress checkpoint (what the client was delivered is never free), or
released without a charge when it made no progress. Releasing a hold whose request still runs is
safe: that request's own settle then bills it at most once (in full after a release; nothing more
after a checkpoint settle). Bad input prints one line and exits 2, like every billing verb.
"""

from __future__ import annotations

import argparse

from llmaas.billing.cli_commands import _database, _table, _verb, _when, _whole, common_options
from llmaas.billing.holds import (
    MAX_ID_CHARS,
    MAX_LISTED,
    HoldView,
    close_hold_by_operator,
    list_holds,
    sweep_expired_holds,
)
from llmaas.billing.money import format_usd
from llmaas.errors import InvalidRequestError


def _view_json(h: HoldView) -> dict:
    return {
        "id": h.id,
        "request_id": h.request_id,
        "account": h.account,
        "model": h.model,
        "amount_usd": format_usd(h.amount_micros),
        "status": h.status,
        "owner": h.owner,
        "created_at": _when(h.created_at),
        "expires_at": _when(h.expires_at),
        "owner_lease_until": _when(h.lease_until),
        "progress": None
        if h.progress_tokens is None
        else dict(zip(("prompt_tokens", "cached_tokens", "completion_tokens"), h.progress_tokens)),
        "progress_at": _when(h.progress_at),
        "expired": h.expired,
    }


@_verb
def cmd_holds_list(args: argparse.Namespace) -> int:
    limit = _whole(args.limit, "limit")
    if not 1 <= limit <= MAX_LISTED:
        raise InvalidRequestError(f"'limit' must be between 1 and {MAX_LISTED}", param="limit")
    with _database(args) as db:
        holds = list_holds(db, args.account, include_closed=args.all, limit=limit)
    if args.json:
        import json

        print(json.dumps([_view_json(h) for h in holds], indent=2))
        return 0
    rows = [
        (
            h.id,
            h.request_id,
            h.account,
            h.model,
            format_usd(h.amount_micros),
            h.status + (" (expired)" if h.expired else ""),
            h.owner,
            _when(h.created_at),
            _when(h.expires_at),
            _when(h.lease_until),
            "-" if h.progress_tokens is None else "/".join(str(t) for t in h.progress_tokens),
        )
        for h in holds
    ]
    headers = (
        "id",
        "request_id",
        "account",
        "model",
        "held_usd",
        "status",
        "owner",
        "created",
        "expires",
        "owner_lease",
        "progress(p/c/o)",
    )
    _table(headers, rows, right=("id", "held_usd"))
    return 0


@_verb
def cmd_holds_release(args: argparse.Namespace) -> int:
    target = args.hold_or_request_id
    if (target is None) == (not args.expired):
        raise InvalidRequestError(
            "give one hold id or request id, or --expired (not both)", param="hold_or_request_id"
        )
    if target is not None and not 0 < len(target) <= MAX_ID_CHARS:
        raise InvalidRequestError(
            f"a hold id or request id is 1-{MAX_ID_CHARS} characters", param="hold_or_request_id"
        )
    with _database(args) as db:
        if args.expired:
            swept = sweep_expired_holds(db, limit=MAX_LISTED)
            result = {"settled": swept.settled, "released": swept.released}
            line = (
                f"closed {swept.closed} expired holds: {swept.settled} billed at their last checkpoint "
                f"(${format_usd(swept.cost_micros)}), {swept.released} released"
            )
        else:
            closed = close_hold_by_operator(db, target)
            result = {"request_id": closed.request_id, "outcome": closed.outcome}
            if closed.outcome == "settled":
                result["cost_usd"] = format_usd(closed.cost_micros)
                line = (
                    f"hold of {closed.request_id} settled at its last checkpoint: "
                    f"${format_usd(closed.cost_micros)}"
                )
            elif closed.outcome == "released":
                line = f"hold of {closed.request_id} released"
            else:
                line = f"hold of {closed.request_id} was closed meanwhile: nothing changed"
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(line)
    return 0


def add_holds_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `holds list|release` to `llmaas`'s subparsers."""
    common = common_options()
    holds = subparsers.add_parser("holds", help="list and release credit holds of running requests")
    hh = holds.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = hh.add_parser("list", help="list open holds (all with --all)", parents=[common])
    p.set_defaults(func=cmd_holds_list)
    p.add_argument("--account", default=None, help="only this account's holds")
    p.add_argument("--all", action="store_true", help="also settled and released holds")
    p.add_argument("--limit", default="100", help=f"at most this many, newest first (1-{MAX_LISTED})")
    p = hh.add_parser(
        "release",
        help="close an open hold now (billed at its last progress checkpoint, else released)",
        parents=[common],
    )
    p.set_defaults(func=cmd_holds_release)
    p.add_argument("hold_or_request_id", nargs="?", default=None, help="a hold id or a request id")
    p.add_argument("--expired", action="store_true", help="close every expired hold (one sweep)")
