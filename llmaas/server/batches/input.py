"""A batch's input file, line by line, in OpenAI's format:

    {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

A line that is not such an object (not JSON, no or a repeated custom_id, another method or endpoint)
is refused by itself: it goes to the error file with the reason, and the other lines run. The body is
validated when the line runs, by the endpoint's own request model (runner.py).
"""

from __future__ import annotations

import json
from typing import Any

from llmaas.billing.batches import MAX_CUSTOM_ID, MAX_LINES, NewLine


def _refused(line: int, custom_id: str | None, message: str) -> NewLine:
    return NewLine(
        line, custom_id, None, {"code": "invalid_request", "message": f"Line {line + 1}: {message}"}
    )


def read_lines(data: bytes, endpoint: str) -> list[NewLine]:
    """The lines of `data` (blank lines skipped), each to run or refused; at most MAX_LINES + 1 (one
    more tells the batch it has too many)."""
    lines: list[NewLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines()):
        if not raw.strip():
            continue
        if len(lines) > MAX_LINES:
            break
        lines.append(_read_line(number, raw, endpoint, seen))
    return lines


def _read_line(number: int, raw: bytes, endpoint: str, seen: set[str]) -> NewLine:
    try:
        item: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return _refused(number, None, f"not valid JSON ({exc})")
    if not isinstance(item, dict):
        return _refused(number, None, "must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        return _refused(number, None, f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters")
    if custom_id in seen:
        return _refused(number, custom_id, f"'custom_id' {custom_id!r} is used by an earlier line")
    seen.add(custom_id)
    if item.get("method") != "POST":
        return _refused(number, custom_id, "'method' must be 'POST'")
    if item.get("url") != endpoint:
        return _refused(number, custom_id, f"'url' must be the batch's endpoint {endpoint!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        return _refused(number, custom_id, "'body' must be a JSON object")
    unknown = set(item) - {"custom_id", "method", "url", "body"}
    if unknown:
        return _refused(number, custom_id, f"unknown field {sorted(unknown)[0]!r}")
    return NewLine(number, custom_id, body)
