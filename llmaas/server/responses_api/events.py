"""A streamed response as the Responses API's typed events, each with its `sequence_number`:

    response.created, response.in_progress,
    per text reply: response.output_item.added, response.content_part.added,
        response.output_text.delta ..., response.output_text.done, response.content_part.done,
        response.output_item.done
    per function call: response.output_item.added, response.function_call_arguments.delta ...,
        response.function_call_arguments.done, response.output_item.done
    response.completed (or response.incomplete when max_output_tokens cut it);
    a failure mid-stream: error, then response.failed.

Text and calls are read by the same parser a whole response goes through (server/tools.py), so a
stream re-assembles to exactly the output of the same request unstreamed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from llmaas.errors import LlmaasError
from llmaas.server.reply import Reply
from llmaas.server.responses_api import convert
from llmaas.server.tool_formats import ToolFormat
from llmaas.server.tools import ToolCall, ToolCallParser

Finish = Callable[[dict[str, Any]], Any]  # the final response object -> awaitable (stores it)


class _Writer:
    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _OpenItem:
    """The output item being streamed: a message (text) or a function call."""

    def __init__(self, index: int, item: dict[str, Any]):
        self.index, self.item = index, item

    @property
    def id(self) -> str:
        return self.item["id"]


async def response_events(
    reply: Reply,
    snapshot: Callable[..., dict[str, Any]],
    tool_format: ToolFormat | None,
    finish: Finish,
) -> AsyncIterator[str]:
    """`snapshot(status=..., output=..., ...)`: the response object at that point (convert.response_object
    with this request's fields bound); `finish(response)` is awaited before response.completed (storing
    it, so that a client that reads `completed` can retrieve it or chain from it at once)."""
    emit = _Writer()
    yield emit("response.created", response=snapshot(status="in_progress", output=[]))
    yield emit("response.in_progress", response=snapshot(status="in_progress", output=[]))
    parser = ToolCallParser(tool_format) if tool_format is not None else None
    done: list[dict[str, Any]] = []  # finished output items
    text: _OpenItem | None = None
    call: _OpenItem | None = None
    finish_reason = None
    try:
        async for _, out in reply.run.outputs():
            choice = out.outputs[0]
            delta, calls = choice.delta_text, []
            if parser is not None:
                delta, calls = parser.feed(choice.delta_text)
                if choice.finish_reason is not None:
                    delta += parser.finish()[0]
            if delta:
                if text is None:
                    text = _OpenItem(len(done), convert.message_item("", "in_progress"))
                    text.item["content"] = []
                    yield emit("response.output_item.added", output_index=text.index, item=text.item)
                    yield emit(
                        "response.content_part.added",
                        item_id=text.id,
                        output_index=text.index,
                        content_index=0,
                        part=convert.output_text(""),
                    )
                    text.item["content"] = [convert.output_text("")]
                text.item["content"][0]["text"] += delta
                yield emit(
                    "response.output_text.delta",
                    item_id=text.id,
                    output_index=text.index,
                    content_index=0,
                    delta=delta,
                    logprobs=[],
                )
            for piece in calls:
                if "id" in piece:  # a new call: the one before it is complete
                    if call is not None:
                        for event in _close_call(emit, call, done):
                            yield event
                    started = ToolCall(piece["id"], piece["function"]["name"])
                    call = _OpenItem(len(done), convert.call_item(started, "in_progress"))
                    yield emit("response.output_item.added", output_index=call.index, item=call.item)
                fragment = piece["function"].get("arguments", "")
                if fragment and call is not None:
                    call.item["arguments"] += fragment
                    yield emit(
                        "response.function_call_arguments.delta",
                        item_id=call.id,
                        output_index=call.index,
                        delta=fragment,
                    )
            if choice.finish_reason is not None:
                finish_reason = choice.finish_reason
    except LlmaasError as exc:
        error = {"code": exc.code or exc.error_type, "message": exc.message}
        yield emit("error", code=error["code"], message=exc.message, param=exc.param)
        output = done + [o.item for o in (text, call) if o is not None]
        yield emit("response.failed", response=snapshot(status="failed", output=output, error=error))
        return
    status, incomplete = convert.status_of(finish_reason)
    if text is not None:
        for event in _close_text(emit, text, done, status):
            yield event
    if call is not None:
        for event in _close_call(emit, call, done):
            yield event
    if not done:  # an empty reply is still a message, as unstreamed
        empty = _OpenItem(0, convert.message_item("", status))
        yield emit("response.output_item.added", output_index=0, item=empty.item)
        yield emit("response.output_item.done", output_index=0, item=empty.item)
        done.append(empty.item)
    usage = await reply.settle()
    final = snapshot(
        status=status,
        output=done,
        usage=convert.usage(usage),
        incomplete_details=incomplete,
    )
    await finish(final)
    yield emit("response.completed" if status == "completed" else "response.incomplete", response=final)


def _close_text(emit: _Writer, text: _OpenItem, done: list[dict[str, Any]], status: str):
    part = text.item["content"][0]
    where = {"item_id": text.id, "output_index": text.index, "content_index": 0}
    yield emit("response.output_text.done", **where, text=part["text"], logprobs=[])
    yield emit("response.content_part.done", **where, part=part)
    text.item["status"] = status
    yield emit("response.output_item.done", output_index=text.index, item=text.item)
    done.append(text.item)


def _close_call(emit: _Writer, call: _OpenItem, done: list[dict[str, Any]]):
    item = call.item
    yield emit(
        "response.function_call_arguments.done",
        item_id=call.id,
        output_index=call.index,
        name=item["name"],
        arguments=item["arguments"],
    )
    item["status"] = "completed"
    yield emit("response.output_item.done", output_index=call.index, item=item)
    done.append(item)
