"""The operator verbs (`llmaas accounts|keys|credits|prices|usage`), run in-process on a SQLite file."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from datetime import timedelta

import pytest

from llmaas.billing import (
    AuthenticationError,
    balance,
    format_usd,
    hold_for_request,
    list_accounts,
    list_keys,
    list_prices,
    open_database,
    settle,
    verify_key,
)
from llmaas.billing.cli_commands import add_billing_parsers

pytest_plugins = ["tests.billing_services"]  # db_url: SQLite and PostgreSQL


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'billing.sqlite3'}"


@pytest.fixture
def cli(url, capsys):
    """cli('credits', 'grant', 'acme', '10.00') -> (exit status, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="llmaas")
        add_billing_parsers(parser.add_subparsers(dest="verb", required=True))
        capsys.readouterr()
        try:
            args = parser.parse_args([*argv, "--database-url", url])
            status = args.func(args)
        except SystemExit as exc:  # argparse's own errors
            status = exc.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def db(url):
    database = open_database(url)
    yield database
    database.close()


def _ok(result: tuple[int, str, str]) -> str:
    status, out, err = result
    assert status == 0, err
    return out


def test_accounts_create_list_set_plan(cli, db):
    assert "Created account acme (id 1, plan plus); available $1.000000" in _ok(
        cli("accounts", "create", "acme", "--plan", "plus")
    )
    _ok(cli("accounts", "create", "bob", "--no-free-grant"))
    table = _ok(cli("accounts", "list")).splitlines()
    assert table[0].split() == ["id", "name", "plan", "created", "available_usd"]
    assert table[1].split()[1:3] == ["acme", "plus"] and table[1].split()[-1] == "1.000000"
    assert table[2].split()[1:3] == ["bob", "free"] and table[2].split()[-1] == "0.000000"
    # aligned: every line puts the right-aligned last column at the same end
    assert len({len(line) for line in table}) == 1

    _ok(cli("accounts", "set-plan", "bob", "plus"))
    listed = json.loads(_ok(cli("accounts", "list", "--json")))
    assert [(a["name"], a["plan"], a["available_usd"]) for a in listed] == [
        ("acme", "plus", "1.000000"),
        ("bob", "plus", "0.000000"),
    ]


def test_key_shown_once_never_listed_and_revoked(cli, db):
    _ok(cli("accounts", "create", "acme"))
    out = _ok(cli("keys", "create", "--account", "acme", "--expires-in-days", "30", "--models", "m1,m2"))
    secrets_shown = re.findall(r"sk-[A-Za-z0-9_-]{20,}", out)
    assert len(secrets_shown) == 1
    secret = secrets_shown[0]
    assert "will not be shown again" in out
    key_id = re.search(r"key_[0-9a-f]+", out).group(0)

    who = verify_key(db, secret, model="m1")
    assert who.key_id == key_id and who.account_name == "acme"
    assert who.allowed_models == ("m1", "m2")
    [info] = list_keys(db, "acme")
    assert info.expires_at is not None and abs(
        info.expires_at - info.created_at - timedelta(days=30)
    ) < timedelta(minutes=1)

    for listing in (
        cli("keys", "list"),
        cli("keys", "list", "--account", "acme"),
        cli("keys", "list", "--json"),
    ):
        text = _ok(listing)
        assert key_id in text and info.display_prefix in text and "acme" in text
        assert secret not in text and secret[len(info.display_prefix) :] not in text
    table = _ok(cli("keys", "list")).splitlines()
    assert table[0].split() == ["id", "prefix", "account", "created", "expires", "revoked", "models"]
    assert table[1].split()[5] == "-"  # not revoked

    out = _ok(cli("keys", "revoke", key_id))
    assert key_id in out and secret not in out
    with pytest.raises(AuthenticationError):
        verify_key(db, secret)
    [row] = json.loads(_ok(cli("keys", "list", "--json")))
    assert row["revoked_at"] is not None and "secret" not in row


def test_keys_create_json_has_the_secret_once(cli, db):
    _ok(cli("accounts", "create", "acme"))
    status, out, err = cli("keys", "create", "--account", "acme", "--json")
    assert status == 0
    created = json.loads(out)
    assert out.count(created["secret"]) == 1 and created["allowed_models"] is None
    assert "will not be shown again" in err
    assert verify_key(db, created["secret"]).key_id == created["id"]


def test_money_is_exact_grant_charge_balance(cli, db):
    _ok(cli("accounts", "create", "acme", "--no-free-grant"))
    assert "Grant of $10.000000 to acme" in _ok(cli("credits", "grant", "acme", "10.00"))
    _ok(
        cli("prices", "set", "smollm2-135m", "--input", "0.05", "--cached-input", "0.025", "--output", "0.20")
    )

    account_id = list_accounts(db)[0].id
    hold_for_request(db, "req-1", account_id, "smollm2-135m", prompt_tokens=1000, max_completion_tokens=600)
    # (600 * 0.05 + 400 * 0.025 + 500 * 0.20) USD / 1M = 0.000140 USD exactly
    usage = settle(db, "req-1", prompt_tokens=1000, cached_tokens=400, completion_tokens=500)
    assert usage.cost_micros == 140

    record = json.loads(_ok(cli("credits", "balance", "acme", "--json")))
    assert record == {
        "account": "acme",
        "credit_usd": "9.999860",
        "held_usd": "0.000000",
        "overdraft_usd": "0.000000",
        "available_usd": "9.999860",
    }
    table = _ok(cli("credits", "balance", "acme"))
    assert re.search(r"available\s+9\.999860$", table, re.M)

    # Decimal, not float: three grants of 0.1 are exactly 0.3 more
    for _ in range(3):
        _ok(cli("credits", "top-up", "acme", "0.1"))
    assert json.loads(_ok(cli("credits", "balance", "acme", "--json")))["available_usd"] == "10.299860"


def test_grant_expiry_and_top_up(cli, db):
    _ok(cli("accounts", "create", "acme", "--no-free-grant"))
    out = json.loads(_ok(cli("credits", "grant", "acme", "2.5", "--expires-in-days", "7", "--json")))
    assert out["amount_usd"] == "2.500000" and out["available_usd"] == "2.500000"
    out = _ok(cli("credits", "top-up", "acme", "0.000001"))
    assert "Top-up of $0.000001 to acme" in out and "available $2.500001" in out
    assert balance(db, "acme").available_micros == 2_500_001


def test_prices_set_and_list_exact(cli, db):
    out = _ok(cli("prices", "set", "m", "--input", "0.05", "--cached-input", "0.025", "--output", "0.20"))
    assert "input 0.050000, cached input 0.025000, output 0.200000" in out
    _ok(
        cli(
            "prices", "set", "m", "--input", "0.1", "--cached-input", "0.000001", "--output", "3",
            "--effective-from", "2099-01-01",
        )
    )  # fmt: skip
    [old, new] = list_prices(db, "m")
    assert (old.input_micros_per_m, old.cached_input_micros_per_m, old.output_micros_per_m) == (
        50_000,
        25_000,
        200_000,
    )
    assert new.cached_input_micros_per_m == 1 and new.effective_from.year == 2099
    rows = json.loads(_ok(cli("prices", "list", "--json")))
    assert [r["input_usd_per_1m"] for r in rows] == ["0.050000", "0.100000"]
    assert rows[1]["effective_from"] == "2099-01-01T00:00:00Z"
    table = _ok(cli("prices", "list", "--model", "m")).splitlines()
    assert len(table) == 3 and "0.000001" in table[2]


def test_usage_table_json_and_csv(cli, db):
    _ok(cli("accounts", "create", "acme", "--no-free-grant"))
    _ok(cli("accounts", "create", "bob", "--no-free-grant"))
    _ok(cli("credits", "top-up", "acme", "5"))
    _ok(cli("credits", "top-up", "bob", "5"))
    for model in ("a", "b"):
        _ok(cli("prices", "set", model, "--input", "0.3", "--cached-input", "0.1", "--output", "0.7"))
    ids = {a.name: a.id for a in list_accounts(db)}
    expected = 0
    for i, (name, model, prompt, cached, completion) in enumerate(
        [
            ("acme", "a", 1000, 0, 10),
            ("acme", "b", 333, 33, 3),
            ("acme", "a", 7, 7, 7),
            ("bob", "a", 50, 0, 5),
        ]
    ):
        hold_for_request(db, f"r{i}", ids[name], model, prompt, 100)
        cost = settle(db, f"r{i}", prompt, cached, completion).cost_micros
        expected += cost if name == "acme" else 0

    out = _ok(cli("usage", "--account", "acme", "--group-by", "model", "--csv"))
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["model"] for r in rows] == ["a", "b"]
    assert set(rows[0]) == {
        "start_time", "end_time", "model", "requests", "input_tokens", "input_cached_tokens", "output_tokens",
        "cost_usd",
    }  # fmt: skip
    assert [int(r["requests"]) for r in rows] == [2, 1]
    assert int(rows[0]["input_tokens"]) == 1007 and int(rows[0]["input_cached_tokens"]) == 7
    total_micros = sum(int(r["cost_usd"].replace(".", "")) for r in rows)
    assert total_micros == expected == 5_000_000 - balance(db, "acme").available_micros

    page = json.loads(_ok(cli("usage", "--bucket", "1h", "--group-by", "account,model", "--json")))
    results = [r for b in page["data"] for r in b["results"]]
    assert len(page["data"]) in (24, 25) and page["object"] == "page"
    assert sorted((r["account"], r["model"]) for r in results) == [("acme", "a"), ("acme", "b"), ("bob", "a")]
    assert all(r["cost_usd"] == format_usd(r["cost_micros"]) for r in results)

    table = _ok(cli("usage", "--start", "2000-01-01", "--bucket", "1d", "--group-by", "account")).splitlines()
    assert table[0].split()[:3] == ["start_time", "end_time", "account"]
    total = table[-1].split()
    assert total[0] == "total" and total[1] == "4"
    assert total[-1] == format_usd(sum(r["cost_micros"] for r in results))


@pytest.mark.parametrize(
    "argv, param",
    [
        (("credits", "grant", "acme", "-5"), "amount_usd"),
        (("credits", "grant", "acme", "NaN"), "amount_usd"),
        (("credits", "grant", "acme", "Infinity"), "amount_usd"),
        (("credits", "grant", "acme", "0.0000001"), "amount_usd"),
        (("credits", "grant", "acme", "ten"), "amount_usd"),
        (("credits", "grant", "acme", "0"), "amount_usd"),
        (("credits", "grant", "acme", "1", "--expires-in-days", "0"), "expires_in_days"),
        (("credits", "top-up", "acme", "1.5e-7"), "amount_usd"),
        (("credits", "grant", "nobody", "1"), "account"),
        (("credits", "top-up", "nobody", "1"), "account"),
        (("credits", "balance", "nobody"), "account"),
        (("accounts", "create", "new", "--plan", "gold"), "plan"),
        (("accounts", "create", "acme"), "name"),
        (("accounts", "create", "bad name"), "name"),
        (("accounts", "set-plan", "acme", "gold"), "plan"),
        (("accounts", "set-plan", "nobody", "plus"), "account"),
        (("keys", "create", "--account", "nobody"), "account"),
        (("keys", "create", "--account", "acme", "--expires-in-days", "-1"), "expires_in_days"),
        (("keys", "create", "--account", "acme", "--models", "a,,b"), "models"),
        (("keys", "list", "--account", "nobody"), "account"),
        (("keys", "revoke", "key_nope"), "key_id"),
        (("prices", "set", "m", "--input", "-1", "--cached-input", "0", "--output", "0"), "input"),
        (("prices", "set", "m", "--input", "1", "--cached-input", "nan", "--output", "0"), "cached_input"),
        (("prices", "set", "m", "--input", "1", "--cached-input", "0", "--output", "1e-7"), "output"),
        (("usage", "--account", "nobody"), "account"),
        (("usage", "--bucket", "2h"), "bucket"),
        (("usage", "--group-by", "model,project"), "group_by"),
        (("usage", "--start", "yesterday"), "start"),
        (("usage", "--start", "2030-01-02", "--end", "2030-01-01"), "end"),
    ],
)
def test_errors_name_the_parameter_exit_2_and_write_nothing(cli, db, argv, param):
    _ok(cli("accounts", "create", "acme"))
    _ok(cli("prices", "set", "m", "--input", "1", "--cached-input", "0.5", "--output", "2"))
    before = (list_accounts(db), list_keys(db), list_prices(db), balance(db, "acme"))

    status, out, err = cli(*argv)

    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("llmaas: error: ")
    assert f"(parameter: {param})" in err
    assert (list_accounts(db), list_keys(db), list_prices(db), balance(db, "acme")) == before


def test_unopenable_database_is_one_line(capsys, tmp_path):
    parser = argparse.ArgumentParser(prog="llmaas")
    add_billing_parsers(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(
        ["accounts", "list", "--database-url", "postgresql+psycopg://u:hunter2@127.0.0.1:1/x"]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "(parameter: database_url)" in err and "hunter2" not in err


HUGE = "9" * 100_000
BAD_AMOUNTS = ["1e30", "NaN", "Infinity", "1_000", "5000000000000", str(2**64), str(-(2**64)), "1e308", HUGE]
BAD_NUMBERS = [str(2**64), str(-(2**64)), "1e308", "NaN", "100000000", "1_000", "0", HUGE]


def _bounds_cases() -> list[tuple[tuple[str, ...], str]]:
    cases = []
    for verb in ("grant", "top-up"):
        cases += [(("credits", verb, "acme", v), "amount_usd") for v in BAD_AMOUNTS]
        cases += [(("credits", verb, "acme", "1", "--note", v), "note") for v in ("x" * 300, "a\x01b")]
        cases += [(("credits", verb, "x" * 5000, "1"), "account")]
    cases += [
        (("credits", "grant", "acme", "1", "--expires-in-days", v), "expires_in_days") for v in BAD_NUMBERS
    ]
    cases += [
        (("keys", "create", "--account", "acme", "--expires-in-days", v), "expires_in_days")
        for v in BAD_NUMBERS
    ]
    for flag, param in (
        ("--requests-per-minute", "requests_per_minute"),
        ("--tokens-per-minute", "tokens_per_minute"),
    ):
        cases += [
            (("keys", "create", "--account", "acme", flag, v), param)
            for v in [n for n in BAD_NUMBERS if n != "100000000"] + [str(2**70), str(10**10)]
        ]
    cases += [(("keys", "create", "--account", "acme", "--name", v), "name") for v in ("x" * 129, "a\x01b")]
    cases += [(("keys", "create", "--account", "acme", "--models", ",".join(["m"] * 101)), "models")]
    cases += [(("keys", "create", "--account", "acme", "--models", "x" * 129), "models")]
    cases += [(("keys", "create", "--account", "x" * 5000), "account")]
    cases += [(("keys", "list", "--account", "x" * 5000), "account")]
    cases += [(("keys", "revoke", "key_" + "x" * 5000), "key_id")]
    cases += [
        (("accounts", "create", v), "name") for v in ("Admin", "admin", "ACME", "x" * 129, HUGE, "a\x01")
    ]
    cases += [(("accounts", "create", "new", "--plan", "x" * 5000), "plan")]
    cases += [(("accounts", "set-plan", "x" * 5000, "plus"), "account")]
    cases += [(("credits", "balance", "x" * 5000), "account")]
    price = ("prices", "set", "m2", "--input", "1", "--cached-input", "0.5")
    cases += [((*price, "--output", v), "output") for v in BAD_AMOUNTS + ["1000000000000000"]]
    cases += [
        ((*price, "--output", "1", "--effective-from", v), "effective_from")
        for v in ("0001-01-01T00:00:00", "9999-12-31T23:59:59-05:00", "2200-01-01", HUGE)
    ]
    cases += [(("prices", "set", "x" * 129, "--input", "1", "--cached-input", "1", "--output", "1"), "model")]
    cases += [(("prices", "list", "--model", "x" * 129), "model")]
    cases += [(("usage", "--start", v), "start") for v in ("0001-01-01", "9999-12-31T23:59:59-05:00", HUGE)]
    cases += [(("usage", "--end", "2200-01-02"), "end")]
    cases += [(("usage", "--group-by", ",".join(["model"] * 1000)), "group_by")]
    cases += [(("usage", "--account", "x" * 5000), "account")]
    return cases


@pytest.mark.parametrize(("argv", "param"), _bounds_cases())
def test_every_flag_is_bounded_one_line_exit_2_and_nothing_written(cli, db, argv, param):
    """2**64, 1e308, NaN, '1_000', '1e30', huge strings and lists, out-of-range dates: no traceback."""
    _ok(cli("accounts", "create", "acme"))
    _ok(cli("prices", "set", "m", "--input", "1", "--cached-input", "0.5", "--output", "2"))
    before = (list_accounts(db), list_keys(db), list_prices(db), balance(db, "acme"))

    status, out, err = cli(*argv)

    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("llmaas: error: "), err[:500]
    assert re.search(rf"\(parameter: {param}(\[\d+\])?\)", err) and len(err) < 400
    assert (list_accounts(db), list_keys(db), list_prices(db), balance(db, "acme")) == before
    assert _ok(cli("credits", "balance", "acme"))  # the account still works


def test_top_up_bounds_the_account_total(cli, db):
    """`credits top-up ... 1e30` printed a traceback; two of $5e12 overflowed SQLite's INTEGER."""
    _ok(cli("accounts", "create", "whale", "--no-free-grant"))
    for _ in range(10):
        _ok(cli("credits", "top-up", "whale", "1000000000"))
    status, _out, err = cli("credits", "top-up", "whale", "0.000001")
    assert status == 2 and "(parameter: amount_usd)" in err and "most one account may hold" in err
    assert (
        json.loads(_ok(cli("credits", "balance", "whale", "--json")))["available_usd"] == "10000000000.000000"
    )
    assert "whale" in _ok(cli("accounts", "list"))


def test_keys_create_takes_per_key_limits(cli, db):
    _ok(cli("accounts", "create", "acme"))
    created = json.loads(
        _ok(
            cli(
                "keys",
                "create",
                "--account",
                "acme",
                "--requests-per-minute",
                "7",
                "--tokens-per-minute",
                "900",
                "--json",
            )
        )
    )
    assert (created["requests_per_minute"], created["tokens_per_minute"]) == (7, 900)
    assert verify_key(db, created["secret"]).requests_per_minute == 7


def test_the_issue_top_ups_on_sqlite_and_postgresql(db_url, capsys):
    """`credits top-up NAME 5000000000000` twice overflowed the ledger (SQLite INTEGER, PostgreSQL
    bigint) and `credits top-up ... 1e30` printed a traceback; now each is one line and exit 2."""

    def run(*argv: str) -> tuple[int, str]:
        parser = argparse.ArgumentParser(prog="llmaas")
        add_billing_parsers(parser.add_subparsers(dest="verb", required=True))
        args = parser.parse_args([*argv, "--database-url", db_url])
        status = args.func(args)
        return status, capsys.readouterr().err

    assert run("accounts", "create", "whale", "--no-free-grant")[0] == 0
    assert run("accounts", "create", "minnow")[0] == 0
    for amount in ("5000000000000", "5000000000000", "1e30"):
        status, err = run("credits", "top-up", "whale", amount)
        assert status == 2 and err.count("\n") == 1 and "(parameter: amount_usd)" in err
    for _ in range(10):
        assert run("credits", "top-up", "whale", "1000000000")[0] == 0
    status, err = run("credits", "grant", "whale", "1")
    assert status == 2 and "most one account may hold" in err
    assert run("accounts", "list")[0] == 0
    assert run("credits", "balance", "minnow")[0] == 0
