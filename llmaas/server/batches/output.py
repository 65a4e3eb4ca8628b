"""A batch's output and error files, in OpenAI's line format, in input order:

    {"id": "batch_req_...", "custom_id": "...", "response": {"status_code": 200, "request_id": "...",
     "body": {...}}, "error": null}

A line the endpoint refused (a 4xx, as it would have answered over HTTP) goes to the error file with that
status and error body; a line that never ran (malformed, cancelled, expired) with `response: null` and
`error: {"code", "message"}`.
"""

from __future__ import annotations

from llmaas.billing.batches import LineOutcome, line_request_id
from llmaas.server.responses import dumps


def output_files(batch_id: str, outcomes: list[LineOutcome]) -> tuple[bytes, bytes]:
    """(output file, error file) contents; either may be empty."""
    output: list[str] = []
    errors: list[str] = []
    for o in outcomes:
        request_id = line_request_id(batch_id, o.line)
        item = {"id": f"batch_req_{request_id}", "custom_id": o.custom_id}
        if o.status == "succeeded":
            response = {"status_code": 200, "request_id": request_id, "body": o.response}
            output.append(dumps({**item, "response": response, "error": None}))
            continue
        error = o.error or {"code": "server_error", "message": "The line did not run."}
        if "status_code" in error:
            response = {"status_code": error["status_code"], "request_id": request_id, "body": error["body"]}
            errors.append(dumps({**item, "response": response, "error": None}))
        else:
            errors.append(dumps({**item, "response": None, "error": error}))
    return _jsonl(output), _jsonl(errors)


def _jsonl(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()
