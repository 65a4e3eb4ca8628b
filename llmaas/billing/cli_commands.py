"""Operator verbs over the billing library: `llmaas accounts|keys|credits|prices|usage ...`.

Each verb is a short function: parse and check the arguments (amounts through money.py, so `10.00` is
exact and floats never appear; every other bound through operator_input.py, the same checks as the
/admin API), call the library, print an aligned table or `--json` (records.py: the /admin API's shapes).
Arguments are checked before the database is opened, and every library call checks before it
writes, so a bad amount or an unknown account/key/plan writes nothing: it prints one line naming the
parameter on stderr and returns 2. An API key's secret is printed once, by `keys create`, and nowhere
else (listings show its id and display prefix).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from llmaas.billing import operator_input as check
from llmaas.billing.accounts import check_account_name, create_account, list_accounts, set_plan
from llmaas.billing.credits import balance, find_usage, grant, top_up
from llmaas.billing.db import Database, default_database_url, open_database
from llmaas.billing.keys import create_key, list_keys, revoke_key
from llmaas.billing.money import credit_to_micros, format_usd
from llmaas.billing.plans import DEFAULT_FREE_GRANT, PLANS, get_plan
from llmaas.billing.prices import TIERS, list_prices, price_micros, set_price
from llmaas.billing.records import (
    account_record,
    balance_record,
    credit_record,
    key_record,
    price_record,
    usage_record,
)
from llmaas.billing.schema import utcnow
from llmaas.billing.usage_report import BUCKET_MINUTES, GROUP_BY, usage_report
from llmaas.errors import InvalidRequestError, LlmaasError

# When --start is not given, `usage` looks back this far (a screenful of buckets of each width).
DEFAULT_LOOKBACK = {"1m": timedelta(hours=1), "1h": timedelta(days=1), "1d": timedelta(days=7)}

# ---------------------------------------------------------------- helpers


def _fail(exc: LlmaasError) -> int:
    where = f" (parameter: {exc.param})" if exc.param else ""
    print(f"llmaas: error: {exc.message}{where}", file=sys.stderr)
    return 2


def _check_encodable(args: argparse.Namespace) -> None:
    """Every text argument is valid UTF-8. Bytes that are not (a lone surrogate's, from a shell) reach
    Python as surrogate-escaped characters that no database, JSON or terminal can take: refused here,
    once for every verb, before anything is stored that a later listing could not print."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequestError(
                        f"'{name}' is not valid UTF-8 text (invalid bytes in the argument)", param=name
                    ) from None


def _verb(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Project errors become one line on stderr and exit status 2 (also when called without cli.main);
    a database failure is one line and exit status 1."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            _check_encodable(args)
            return func(args)
        except LlmaasError as exc:
            return _fail(exc)
        except SQLAlchemyError as exc:  # the database refused (gone, full, ...): one line, not a traceback
            print(f"llmaas: database error: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
            return 1

    return run


@contextmanager
def _database(args: argparse.Namespace) -> Iterator[Database]:
    url = args.database_url or default_database_url()
    try:
        db = open_database(url)
    except (SQLAlchemyError, ValueError) as exc:
        shown = make_url(url).render_as_string(hide_password=True) if "://" in url else url
        raise InvalidRequestError(
            f"cannot open the billing database {shown}: {type(exc).__name__}", param="database_url"
        ) from None
    try:
        yield db
    finally:
        db.close()


def _whole(text: str | None, param: str) -> int | None:
    """A whole-number flag, read here rather than by argparse so a bad one is one line naming it."""
    return None if text is None else check.whole_number_text(text, param)


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch_iso(epoch: int) -> str:
    return _when(datetime.fromtimestamp(epoch, timezone.utc))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[str] = ()) -> None:
    """Aligned columns; columns named in `right` (numbers, money) are right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        parts = [
            c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(row, widths, headers, strict=True)
        ]
        print("  ".join(parts).rstrip())


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _account_names(db: Database) -> dict[int, str]:
    return {a.id: a.name for a in list_accounts(db)}


def _plan(name: str) -> str:
    return get_plan(check.plan_name(name)).name


# ---------------------------------------------------------------- accounts


@_verb
def cmd_accounts_create(args: argparse.Namespace) -> int:
    check_account_name(args.name)
    _plan(args.plan)
    free_grant = None if args.no_free_grant else DEFAULT_FREE_GRANT
    with _database(args) as db:
        info = create_account(db, args.name, plan=args.plan, free_grant=free_grant)
        available = balance(db, info.id).available_micros
    if args.json:
        _print_json(account_record(info, available))
    else:
        print(
            f"Created account {info.name} (id {info.id}, plan {info.plan}); "
            f"available ${format_usd(available)}"
        )
    return 0


@_verb
def cmd_accounts_list(args: argparse.Namespace) -> int:
    with _database(args) as db:
        rows = [(a, balance(db, a.id).available_micros) for a in list_accounts(db)]
    if args.json:
        _print_json([account_record(a, avail) for a, avail in rows])
        return 0
    _table(
        ["id", "name", "plan", "created", "available_usd"],
        [(a.id, a.name, a.plan, _when(a.created_at), format_usd(avail)) for a, avail in rows],
        right=("id", "available_usd"),
    )
    return 0


@_verb
def cmd_accounts_set_plan(args: argparse.Namespace) -> int:
    check_account_name(args.name, "account")
    _plan(args.plan)
    with _database(args) as db:
        info = set_plan(db, args.name, args.plan)
    if args.json:
        _print_json(account_record(info))
    else:
        print(f"Account {info.name} is now on plan {info.plan}")
    return 0


# ---------------------------------------------------------------- keys


def _models(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if len(text) > check.MAX_ALLOWED_MODELS * (check.MAX_NAME_CHARS + 1):
        raise InvalidRequestError("'models' is too long", param="models")
    models = [m.strip() for m in text.split(",")]
    if not all(models):
        raise InvalidRequestError("'models' is a comma-separated list of model names", param="models")
    return check.model_list(models)


@_verb
def cmd_keys_create(args: argparse.Namespace) -> int:
    check_account_name(args.account, "account")
    valid_for = check.expires_in_days(_whole(args.expires_in_days, "expires_in_days"))
    models = _models(args.models)
    check.text(args.name, "name", required=False)
    rpm = check.requests_per_minute(_whole(args.requests_per_minute, "requests_per_minute"))
    tpm = check.tokens_per_minute(_whole(args.tokens_per_minute, "tokens_per_minute"))
    with _database(args) as db:
        new = create_key(
            db,
            args.account,
            name=args.name,
            expires_at=utcnow() + valid_for if valid_for is not None else None,
            allowed_models=models,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
        )
    info = new.info
    if args.json:
        _print_json({**key_record(info, args.account), "secret": new.secret})
        print("This secret will not be shown again: store it now.", file=sys.stderr)
        return 0
    models_text = ",".join(info.allowed_models) if info.allowed_models is not None else "all"
    print(
        f"API key {info.id} for account {args.account} "
        f"(expires {_when(info.expires_at)}; models {models_text}):"
    )
    print()
    print(f"    {new.secret}")
    print()
    print("This secret will not be shown again: store it now. Only its hash is kept.")
    return 0


@_verb
def cmd_keys_list(args: argparse.Namespace) -> int:
    if args.account is not None:
        check_account_name(args.account, "account")
    with _database(args) as db:
        keys = list_keys(db, args.account)
        names = _account_names(db)
    if args.json:
        _print_json([key_record(k, names.get(k.account_id)) for k in keys])
        return 0
    _table(
        ["id", "prefix", "account", "created", "expires", "revoked", "models"],
        [
            (
                k.id,
                k.display_prefix + "...",
                names.get(k.account_id, str(k.account_id)),
                _when(k.created_at),
                _when(k.expires_at),
                _when(k.revoked_at),
                "all" if k.allowed_models is None else (",".join(k.allowed_models) or "none"),  # []: none
            )
            for k in keys
        ],
    )
    return 0


@_verb
def cmd_keys_revoke(args: argparse.Namespace) -> int:
    check.key_id(args.key_id)
    with _database(args) as db:
        info = revoke_key(db, args.key_id)
        names = _account_names(db)
    if args.json:
        _print_json(key_record(info, names.get(info.account_id)))
    else:
        print(f"Revoked API key {info.id} ({info.display_prefix}...) at {_when(info.revoked_at)}")
    return 0


# ---------------------------------------------------------------- credits


def _balance_record(db: Database, account: str) -> dict[str, Any]:
    return balance_record(account, balance(db, account))


def _credit_done(args: argparse.Namespace, what: str, entry_id: int, micros: int, record: dict) -> int:
    if args.json:
        _print_json(credit_record(entry_id, what, micros, record))
    else:
        print(
            f"{what.replace('_', '-').capitalize()} of ${format_usd(micros)} to {args.account} "
            f"(ledger entry {entry_id}); available ${record['available_usd']}"
        )
    return 0


@_verb
def cmd_credits_grant(args: argparse.Namespace) -> int:
    check_account_name(args.account, "account")
    micros = credit_to_micros(args.amount_usd, "amount_usd")
    valid_for = check.expires_in_days(_whole(args.expires_in_days, "expires_in_days"))
    check.note(args.note)
    with _database(args) as db:
        expires = utcnow() + valid_for if valid_for is not None else None
        entry = grant(db, args.account, micros, expires_at=expires, note=args.note)
        record = _balance_record(db, args.account)
    return _credit_done(args, "grant", entry, micros, record)


@_verb
def cmd_credits_top_up(args: argparse.Namespace) -> int:
    check_account_name(args.account, "account")
    micros = credit_to_micros(args.amount_usd, "amount_usd")
    check.note(args.note)
    with _database(args) as db:
        entry = top_up(db, args.account, micros, note=args.note)
        record = _balance_record(db, args.account)
    return _credit_done(args, "top_up", entry, micros, record)


@_verb
def cmd_credits_balance(args: argparse.Namespace) -> int:
    check_account_name(args.account, "account")
    with _database(args) as db:
        record = _balance_record(db, args.account)
    if args.json:
        _print_json(record)
    else:
        _table(
            ["", "usd"], [(k.removesuffix("_usd"), v) for k, v in record.items() if k != "account"], ("usd",)
        )
    return 0


# ---------------------------------------------------------------- prices


@_verb
def cmd_prices_set(args: argparse.Namespace) -> int:
    # A plug-in (llmaas bench's --from-cost) may fill the three prices from elsewhere first.
    fill_prices = getattr(args, "fill_prices", None)
    if fill_prices is not None:
        fill_prices(args)
    missing = [n for n in ("input", "cached_input", "output") if getattr(args, n) is None]
    if missing:
        hint = " (or all prices from a bench result: --from-cost)" if fill_prices is not None else ""
        raise InvalidRequestError(f"give --{missing[0].replace('_', '-')}{hint}", missing[0])
    # Check all three before opening the database (set_price checks them too, before writing).
    check.model_name(args.model)
    for value, param in ((args.input, "input"), (args.cached_input, "cached_input"), (args.output, "output")):
        price_micros(value, param)
    effective_from = check.parse_time(args.effective_from, "effective_from")
    with _database(args) as db:
        price = set_price(
            db,
            args.model,
            input_usd=args.input,
            cached_input_usd=args.cached_input,
            output_usd=args.output,
            effective_from=effective_from,
            batch_percent=args.batch_percent,
            flex_percent=args.flex_percent,
            priority_percent=args.priority_percent,
        )
    record = price_record(price)
    if args.json:
        _print_json(record)
    else:
        print(
            f"Price {price.id} for {price.model} from {_when(price.effective_from)}, USD per 1M tokens: "
            f"input {record['input_usd_per_1m']}, cached input {record['cached_input_usd_per_1m']}, "
            f"output {record['output_usd_per_1m']}; batch {price.batch_percent}%, "
            f"flex {price.flex_percent}%, priority {price.priority_percent}%"
        )
    return 0


@_verb
def cmd_prices_list(args: argparse.Namespace) -> int:
    if args.model is not None:
        check.model_name(args.model)
    with _database(args) as db:
        records = [price_record(p) for p in list_prices(db, args.model)]
    if args.json:
        _print_json(records)
        return 0
    columns = [
        "id",
        "model",
        "input_usd_per_1m",
        "cached_input_usd_per_1m",
        "output_usd_per_1m",
        "batch_percent",
        "flex_percent",
        "priority_percent",
        "effective_from",
    ]
    _table(columns, [[r[c] for c in columns] for r in records], right=columns[:1] + columns[2:8])
    return 0


# ---------------------------------------------------------------- usage


def _group_by(text: str | None) -> list[str]:
    if not text:
        return []
    groups = check.distinct([g.strip() for g in text.split(",", check.MAX_FILTER_VALUES)], "group_by")
    unknown = [g for g in groups if g not in GROUP_BY]
    if unknown:
        raise InvalidRequestError(
            f"unknown 'group_by' {', '.join(unknown)}; takes {', '.join(GROUP_BY)}", param="group_by"
        )
    return groups


def _one_request(args: argparse.Namespace) -> int:
    """`llmaas usage --request-id ID`: the usage records of one request (its x-request-id) or of a
    client's X-Client-Request-Id."""
    with _database(args) as db:
        records = [
            usage_record(u, _account_names(db).get(u.account_id)) for u in find_usage(db, args.request_id)
        ]
    if args.json:
        _print_json({"object": "list", "data": records})
        return 0
    if not records:
        print(f"no usage record has the request id or client request id {args.request_id!r}")
        return 0
    columns = list(records[0])
    _table(columns, [list(r.values()) for r in records], right=columns[6:10])
    return 0


@_verb
def cmd_usage(args: argparse.Namespace) -> int:
    if args.request_id is not None:
        return _one_request(args)
    if args.json and args.csv:
        raise InvalidRequestError("choose one of --json and --csv", param="csv")
    if args.bucket not in BUCKET_MINUTES:
        raise InvalidRequestError(f"'bucket' must be one of {', '.join(BUCKET_MINUTES)}", param="bucket")
    groups = _group_by(args.group_by)
    if args.account is not None:
        check_account_name(args.account, "account")
    # The report works in whole seconds and `end` is exclusive: by default take the next whole second,
    # so a request that finished a moment ago is in.
    end = check.parse_time(args.end, "end") or utcnow().replace(microsecond=0) + timedelta(seconds=1)
    start = check.parse_time(args.start, "start") or end - DEFAULT_LOOKBACK[args.bucket]
    if end <= start:
        raise InvalidRequestError("'end' must be after 'start'", param="end")
    with _database(args) as db:
        buckets = usage_report(
            db, start, end, bucket_width=args.bucket, group_by=groups, account=args.account
        )
    if args.json:
        _print_json(
            {
                "object": "page",
                "data": [
                    {
                        "object": "bucket",
                        "start_time": b.start_time,
                        "end_time": b.end_time,
                        "results": [
                            {
                                "object": "organization.usage.completions.result",
                                **{g: getattr(r, g) for g in GROUP_BY if g in groups},
                                "num_model_requests": r.num_model_requests,
                                "input_tokens": r.input_tokens,
                                "input_cached_tokens": r.input_cached_tokens,
                                "output_tokens": r.output_tokens,
                                "cost_micros": r.cost_micros,
                                "cost_usd": format_usd(r.cost_micros),
                            }
                            for r in b.results
                        ],
                    }
                    for b in buckets
                ],
            }
        )
        return 0
    group_columns = [g for g in GROUP_BY if g in groups]
    columns = [
        "start_time",
        "end_time",
        *group_columns,
        "requests",
        "input_tokens",
        "input_cached_tokens",
        "output_tokens",
        "cost_usd",
    ]
    rows = [
        [
            _epoch_iso(b.start_time),
            _epoch_iso(b.end_time),
            *[getattr(r, g) for g in group_columns],
            r.num_model_requests,
            r.input_tokens,
            r.input_cached_tokens,
            r.output_tokens,
            format_usd(r.cost_micros),
        ]
        for b in buckets
        for r in b.results
    ]
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return 0
    results = [r for b in buckets for r in b.results]
    total = (
        ["total", "", *[""] * len(group_columns)]
        + [
            sum(getattr(r, f) for r in results)
            for f in ("num_model_requests", "input_tokens", "input_cached_tokens", "output_tokens")
        ]
        + [format_usd(sum(r.cost_micros for r in results))]
    )
    _table(columns, [*rows, total], right=columns[-5:])
    return 0


# ---------------------------------------------------------------- parsers


def _leaf(
    sub: argparse._SubParsersAction, name: str, help: str, func: Callable, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, parents=[common])
    p.set_defaults(func=func)
    return p


def common_options() -> argparse.ArgumentParser:
    """The options every billing verb takes (a parent parser): --database-url and --json."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL of the billing database (default: SQLite file billing.sqlite3 under "
        "LLMAAS_HOME; postgresql+psycopg://... for production)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return common


def add_billing_parsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the verbs `accounts`, `keys`, `credits`, `prices` and `usage` to `llmaas`'s subparsers.

    Returns the `prices set` parser, for options that fill its prices (a `fill_prices(args)` default).
    """
    common = common_options()
    plans = ", ".join(PLANS)

    accounts = subparsers.add_parser("accounts", help="create and list accounts, set their plan")
    acc = accounts.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _leaf(
        acc,
        "create",
        "create an account (with the free grant unless --no-free-grant)",
        cmd_accounts_create,
        common,
    )
    p.add_argument("name")
    p.add_argument("--plan", default="free", help=f"one of {plans} (default free)")
    p.add_argument("--no-free-grant", action="store_true", help="do not give the new account the free grant")
    _leaf(acc, "list", "list accounts with their available balance", cmd_accounts_list, common)
    p = _leaf(acc, "set-plan", "move an account to another plan", cmd_accounts_set_plan, common)
    p.add_argument("name")
    p.add_argument("plan", help=f"one of {plans}")

    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    kk = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _leaf(kk, "create", "create an API key: its secret is printed once", cmd_keys_create, common)
    p.add_argument("--account", required=True, help="account name")
    p.add_argument(
        "--expires-in-days",
        default=None,
        help=f"1 to {check.MAX_EXPIRES_IN_DAYS} (default: never expires)",
    )
    p.add_argument("--models", default=None, help="comma-separated allow-list (default: every model)")
    p.add_argument("--name", default=None, help="a label for the key")
    p.add_argument(
        "--requests-per-minute",
        default=None,
        help=f"this key's own limit, 1 to {check.MAX_REQUESTS_PER_MINUTE:,} (default: the plan's)",
    )
    p.add_argument(
        "--tokens-per-minute",
        default=None,
        help=f"this key's own limit, 1 to {check.MAX_TOKENS_PER_MINUTE:,} (default: the plan's)",
    )
    p = _leaf(kk, "list", "list API keys (never their secrets)", cmd_keys_list, common)
    p.add_argument("--account", default=None, help="only this account's keys")
    p = _leaf(kk, "revoke", "revoke an API key at once", cmd_keys_revoke, common)
    p.add_argument("key_id", help="the key's id (key_...), as `keys list` shows it")

    credits = subparsers.add_parser("credits", help="grant and top up credit, show balances")
    cc = credits.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _leaf(cc, "grant", "grant free credit, optionally expiring", cmd_credits_grant, common)
    p.add_argument("account")
    p.add_argument("amount_usd", help="USD, exact to the micro-dollar, e.g. 10.00")
    p.add_argument(
        "--expires-in-days", default=None, help=f"1 to {check.MAX_EXPIRES_IN_DAYS} (default: never expires)"
    )
    p.add_argument("--note", default=None)
    p = _leaf(cc, "top-up", "add paid credit (never expires)", cmd_credits_top_up, common)
    p.add_argument("account")
    p.add_argument("amount_usd", help="USD, exact to the micro-dollar, e.g. 25.00")
    p.add_argument("--note", default=None)
    p = _leaf(
        cc,
        "balance",
        "an account's credit, holds, overdraft and available balance",
        cmd_credits_balance,
        common,
    )
    p.add_argument("account")

    prices = subparsers.add_parser("prices", help="set and list model prices (USD per 1M tokens)")
    pp = prices.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _leaf(pp, "set", "add a price version for a model, in USD per 1M tokens", cmd_prices_set, common)
    p.add_argument("model")
    p.add_argument("--input", help="USD per 1M uncached prompt tokens, e.g. 0.05")
    p.add_argument("--cached-input", help="USD per 1M cached prompt tokens")
    p.add_argument("--output", help="USD per 1M completion tokens")
    p.add_argument("--effective-from", default=None, help="ISO datetime, UTC unless zoned (default: now)")
    for tier, percent in TIERS.items():
        p.add_argument(
            f"--{tier}-percent", default=None, help=f"the {tier} tier's percent of the prices ({percent})"
        )
    prices_set = p
    p = _leaf(pp, "list", "list every price version, oldest first", cmd_prices_list, common)
    p.add_argument("--model", default=None, help="only this model's history")

    p = subparsers.add_parser(
        "usage",
        help="usage and cost per time bucket",
        description="usage and cost per time bucket",
        parents=[common],
    )
    p.set_defaults(func=cmd_usage)
    p.add_argument("--account", default=None, help="only this account")
    p.add_argument(
        "--start", default=None, help="ISO date/datetime, UTC unless zoned (default: see --bucket)"
    )
    p.add_argument("--end", default=None, help="ISO date/datetime, exclusive (default: now)")
    p.add_argument(
        "--bucket", default="1d", help="bucket width: 1m, 1h or 1d (default 1d; default range 1h, 1d, 7d)"
    )
    p.add_argument("--group-by", default=None, help=f"comma-separated: {','.join(GROUP_BY)}")
    p.add_argument("--csv", action="store_true", help="print CSV (one row per bucket and group, no total)")
    p.add_argument(
        "--request-id",
        default=None,
        help="instead of a report: the usage record of one request, by its id (the response's x-request-id) "
        "or the client's X-Client-Request-Id",
    )
    return prices_set
