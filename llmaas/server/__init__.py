"""HTTP: the OpenAI protocol <-> the engine. `create_app` builds the FastAPI app; `llmaas serve` runs it."""

from llmaas.server.app import create_app
from llmaas.server.usage import BillingHook, RequestUsage

__all__ = ["BillingHook", "RequestUsage", "create_app"]
