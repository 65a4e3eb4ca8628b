"""Service tiers over real HTTP with the openai SDK: flex and priority echoed and billed at their
percentages of the price version, the plan's restriction (403 naming the tier), the percentages set
through /admin and `llmaas prices set`, and usage reports by tier."""
# ruff: noqa: F811  (fixtures are imported and requested by name)

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import httpx
import openai
import pytest

from llmaas.billing import cost_micros, current_price, get_usage, usage_report
from llmaas.billing.plans import BATCH_PRIORITY, tier_priority
from llmaas.billing.schema import utcnow
from tests.test_batches import base_url, db  # noqa: F401
from tests.test_server_api import MODEL
from tests.test_server_billing import HELLO, engine, new_account, sdk  # noqa: F401


def test_flex_and_priority_are_echoed_and_billed_at_their_percentages(base_url, db):
    client = sdk(base_url, new_account(db, "tiers-co", plan="plus"))
    price = current_price(db, MODEL)
    for tier, percent in (("flex", 50), ("priority", 200), ("default", 100), ("auto", 100)):
        resp = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=5, temperature=0, service_tier=tier
        )
        served = "default" if tier == "auto" else tier
        assert resp.service_tier == served
        record = get_usage(db, resp.id)
        u = resp.usage
        tokens = (u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens)
        assert record.cost_micros == cost_micros(price, *tokens, served) > 0
        assert price.tier_percent(served) == percent
        assert (record.service_tier or "default") == served
    text = client.completions.create(
        model=MODEL, prompt="Once", max_tokens=3, extra_body={"service_tier": "flex"}
    )
    assert text.model_extra["service_tier"] == "flex" and get_usage(db, text.id).service_tier == "flex"
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, stream=True, service_tier="priority"
    )
    assert {chunk.service_tier for chunk in stream} == {"priority"}

    now = utcnow()
    rows = usage_report(
        db,
        now - timedelta(hours=1),
        now + timedelta(minutes=1),
        group_by=["service_tier"],
        account="tiers-co",
    )
    by_tier: dict[str, int] = {}
    for r in (r for b in rows for r in b.results):
        by_tier[r.service_tier] = by_tier.get(r.service_tier, 0) + r.num_model_requests
    assert by_tier == {"flex": 2, "priority": 2, "default": 2}


def test_a_plan_without_a_tier_gets_403_naming_it(base_url, db):
    client = sdk(base_url, new_account(db, "free-tier-co", plan="free"))
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, service_tier="priority")
    assert err.value.param == "service_tier" and "'priority'" in err.value.message
    assert err.value.code == "service_tier_not_allowed"
    flex = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, service_tier="flex")
    assert flex.service_tier == "flex"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, service_tier="scale")
    assert err.value.param == "service_tier"


def test_tier_percentages_are_part_of_the_versioned_price(base_url, db, tmp_path):
    admin = httpx.Client(base_url=base_url, headers={"Authorization": "Bearer sk-admin-test"}, timeout=30)
    body = {"model": MODEL, "input": "1.00", "cached_input": "0.10", "output": "2.00", "flex_percent": 25}
    record = admin.post("/admin/prices", json=body).json()
    assert (record["batch_percent"], record["flex_percent"], record["priority_percent"]) == (50, 25, 200)
    assert admin.post("/admin/prices", json={**body, "flex_percent": 0}).status_code == 400
    client = sdk(base_url, new_account(db, "quarter-co", plan="plus"))
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, service_tier="flex")
    u = resp.usage
    tokens = (u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens)
    price = current_price(db, MODEL)
    assert price.flex_percent == 25 and get_usage(db, resp.id).cost_micros == cost_micros(
        price, *tokens, "flex"
    )

    url = str(db.engine.url)
    cli = [sys.executable, "-m", "llmaas.cli", "prices", "set", "other-model", "--database-url", url]
    cli += ["--input", "0.1", "--cached-input", "0.01", "--output", "0.4", "--priority-percent", "300"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "priority 300%" in out.stdout and current_price(db, "other-model").priority_percent == 300


def test_tiers_order_the_engine_priorities():
    free, plus = 0, 10
    assert tier_priority(plus, "priority") > tier_priority(free, "priority") > tier_priority(plus, "default")
    assert tier_priority(free, "default") > tier_priority(plus, "flex") > BATCH_PRIORITY
    assert tier_priority(plus, "batch") == BATCH_PRIORITY
