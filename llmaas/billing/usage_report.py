"""Usage and cost per time bucket, OpenAI-shaped (/v1/organization/usage/completions and /costs).

Buckets are aligned to the UTC epoch grid of their width (a 1d bucket is a UTC day) and a request
falls in the bucket of its finished_at. Every bucket between start and end is returned, empty or
not. Sums are of the stored per-request costs, so a report agrees with the ledger to the micro-USD.
Pass `account` to see one account only: that is what an account's own key may read; `accounts` narrows
the report to several (one query, `IN`: an account named twice counts once). Each record carries the
endpoint that made it ("chat.completions", "completions", "embeddings", ...): `group_by` "endpoint"
splits rows by it, and `endpoints` / `exclude_endpoints` keep or drop some (OpenAI reports
embeddings apart from completions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func, or_, select

from llmaas.billing.accounts import find_account
from llmaas.billing.db import Database
from llmaas.billing.operator_input import epoch_seconds, time_in_window
from llmaas.billing.schema import Account, UsageRecord
from llmaas.errors import InvalidRequestError

BUCKET_MINUTES = {"1m": 1, "1h": 60, "1d": 1440}
GROUP_BY = ("model", "api_key_id", "account", "endpoint", "service_tier")
MAX_BUCKETS = 10_000


@dataclass(frozen=True)
class UsageRow:
    model: str | None  # None when not grouped by model
    api_key_id: str | None
    account: str | None
    num_model_requests: int
    input_tokens: int  # prompt tokens, cached ones included (as OpenAI reports them)
    input_cached_tokens: int
    output_tokens: int
    cost_micros: int
    endpoint: str | None = None  # None when not grouped by endpoint
    service_tier: str | None = None  # None when not grouped by service tier


@dataclass(frozen=True)
class UsageBucket:
    start_time: int  # epoch seconds
    end_time: int
    results: list[UsageRow]


def _epoch(value: datetime | int, param: str) -> int:
    """Epoch seconds within operator_input's window (1970 to 2200)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidRequestError(f"'{param}' must be timezone-aware", param=param)
        return int(time_in_window(value, param).timestamp())
    return epoch_seconds(value, param)


def usage_report(
    db: Database,
    start_time: datetime | int,
    end_time: datetime | int | None = None,
    *,
    bucket_width: str = "1d",
    group_by: tuple[str, ...] | list[str] = (),
    account: int | str | None = None,
    accounts: Sequence[int | str] | None = None,
    endpoints: Sequence[str] | None = None,
    exclude_endpoints: Sequence[str] = (),
) -> list[UsageBucket]:
    start = _epoch(start_time, "start_time")
    end = (
        _epoch(end_time, "end_time") if end_time is not None else int(datetime.now(timezone.utc).timestamp())
    )
    if end <= start:
        raise InvalidRequestError("'end_time' must be after 'start_time'", param="end_time")
    if bucket_width not in BUCKET_MINUTES:
        raise InvalidRequestError(
            f"'bucket_width' must be one of {', '.join(BUCKET_MINUTES)}", param="bucket_width"
        )
    unknown = [g for g in group_by if g not in GROUP_BY]
    if unknown or isinstance(group_by, str):
        raise InvalidRequestError(f"'group_by' takes {', '.join(GROUP_BY)}", param="group_by")
    width = BUCKET_MINUTES[bucket_width] * 60
    first_bucket = start // width * width
    if (end - first_bucket) // width > MAX_BUCKETS:
        raise InvalidRequestError(
            "too many buckets: widen 'bucket_width' or narrow the range", param="end_time"
        )

    bucket = (UsageRecord.epoch_minute // BUCKET_MINUTES[bucket_width]).label("bucket")
    columns = {
        "model": UsageRecord.model,
        "api_key_id": UsageRecord.key_id,
        "account": Account.name,
        "endpoint": UsageRecord.endpoint,
        "service_tier": func.coalesce(UsageRecord.service_tier, "default"),
    }
    groups = [columns[g].label(g) for g in GROUP_BY if g in group_by]
    query = (
        select(
            bucket,
            *groups,
            func.count(UsageRecord.id),
            func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
            func.coalesce(func.sum(UsageRecord.cached_tokens), 0),
            func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
            func.coalesce(func.sum(UsageRecord.cost_micros), 0),
        )
        .join(Account, Account.id == UsageRecord.account_id)
        .where(
            UsageRecord.finished_at >= datetime.fromtimestamp(start, timezone.utc),
            UsageRecord.finished_at < datetime.fromtimestamp(end, timezone.utc),
        )
        .group_by(bucket, *groups)
        .order_by(bucket, *groups)
    )
    if endpoints is not None:
        query = query.where(UsageRecord.endpoint.in_(list(endpoints)))
    if exclude_endpoints:
        query = query.where(
            or_(UsageRecord.endpoint.is_(None), UsageRecord.endpoint.not_in(list(exclude_endpoints)))
        )
    with db.read() as session:
        if account is not None:
            query = query.where(UsageRecord.account_id == find_account(session, account).id)
        if accounts is not None:
            ids = {find_account(session, a).id for a in accounts}  # a set: each account once
            query = query.where(UsageRecord.account_id.in_(sorted(ids)))
        rows = session.execute(query).all()

    by_bucket: dict[int, list[UsageRow]] = {}
    for row in rows:
        values = dict(zip(("bucket", *[g.key for g in groups]), row[: 1 + len(groups)]))
        requests, prompt, cached, completion, cost = (int(v) for v in row[1 + len(groups) :])
        by_bucket.setdefault(int(values["bucket"]) * BUCKET_MINUTES[bucket_width] * 60, []).append(
            UsageRow(
                model=values.get("model"),
                api_key_id=values.get("api_key_id"),
                account=values.get("account"),
                num_model_requests=requests,
                input_tokens=prompt,
                input_cached_tokens=cached,
                output_tokens=completion,
                cost_micros=cost,
                endpoint=values.get("endpoint"),
                service_tier=values.get("service_tier"),
            )
        )
    return [UsageBucket(t, t + width, by_bucket.get(t, [])) for t in range(first_bucket, end, width)]
