"""Pure ASGI middleware (no BaseHTTPMiddleware: it adds a task and copies per request).

* :class:`RequestContextMiddleware` - request id (honoured/echoed ``X-Request-ID``), timing,
  Prometheus request metrics and one JSON access-log line per request.
* :class:`BodySizeLimitMiddleware` - refuses oversized bodies from ``Content-Length`` before
  reading anything, and counts bytes as they arrive for chunked bodies, stopping at the limit,
  so an unbounded upload is never buffered.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response
from app.metrics import ServiceMetrics
from app.request_context import SCOPE_KEY, RequestContext, accept_request_id

access_logger = logging.getLogger("defect.access")


def route_label(scope: Scope) -> str:
    """Route template (``/predict``), never the raw path: bounded metric cardinality."""
    route = scope.get("route")
    if isinstance(route, BaseRoute):
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
    return "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        context = RequestContext(request_id=accept_request_id(headers.get("x-request-id")))
        scope[SCOPE_KEY] = context
        request_id_header = (b"x-request-id", context.request_id.encode("ascii"))
        status = 500

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-request-id" for name, _ in response_headers):
                    response_headers.append(request_id_header)
                message = {**message, "headers": response_headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            elapsed = time.perf_counter() - context.started
            route = route_label(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                fields = {
                    "request_id": context.request_id,
                    "method": method,
                    "route": route,
                    "path": scope.get("path", ""),
                    "status": status,
                    "latency_ms": round(elapsed * 1000.0, 2),
                    **context.log_fields,
                }
                access_logger.info("request", extra={"fields": fields})


class PayloadTooLargeError(HTTPException):
    """Raised from ``receive()`` once the body passes the limit.

    An ``HTTPException`` so that FastAPI's body parsing re-raises it unchanged (it turns other
    errors into a 400) and the app's handler renders it in the service's error schema.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False  # the server rejects malformed framing itself
            if too_large:
                await self._reject(scope, receive, send, declared_length=declared)
                return

        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise PayloadTooLargeError(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise PayloadTooLargeError(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except PayloadTooLargeError:
            # Raised outside a framework handler (e.g. a streaming endpoint): answer here.
            if response_started:
                raise
            await self._reject(scope, receive, send, declared_length=None)

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, declared_length: str | None
    ) -> None:
        message = f"request body exceeds the limit of {self.max_body_bytes} bytes"
        if declared_length is not None:
            message += f" (Content-Length: {declared_length})"
        # No "Connection: close": closing with unread bytes makes the kernel reset the
        # connection, and a client still uploading would never see the 413. uvicorn discards
        # (does not buffer) the rest of the body and drops the connection after its keep-alive
        # timeout, which bounds what an abusive client can push.
        response = error_response(scope, 413, "payload_too_large", message)
        await response(scope, receive, send)
