"""Per-request facts shared between the middleware, the routes and the error handlers.

They travel in the ASGI scope (one dict per request, passed by reference through every layer),
so nothing needs context variables or globals.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Scope

SCOPE_KEY = "defect.request"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class RequestContext:
    """What the access log line and error bodies need to know about a request."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    log_fields: dict[str, Any] = field(default_factory=dict)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(header_value: str | None) -> str:
    """Honour a caller's X-Request-ID when it is safe to log and echo, else mint one."""
    if header_value and _SAFE_REQUEST_ID.match(header_value):
        return header_value
    return new_request_id()


def context_of(scope: Scope) -> RequestContext | None:
    context = scope.get(SCOPE_KEY)
    return context if isinstance(context, RequestContext) else None


def request_id_of(scope: Scope) -> str | None:
    context = context_of(scope)
    return context.request_id if context is not None else None


def require_request_id(scope: Scope) -> str:
    """The request id (the middleware always sets one; a fresh id if called without it)."""
    return request_id_of(scope) or new_request_id()


def annotate(scope: Scope, **fields: Any) -> None:
    """Add fields (e.g. ``label``) to the request's access log line."""
    context = context_of(scope)
    if context is not None:
        context.log_fields.update(fields)
