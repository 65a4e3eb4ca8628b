"""OpenAI's Responses API (/v1/responses) over the chat walk: protocol, conversion, events, store."""
