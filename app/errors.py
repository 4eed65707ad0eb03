"""One error schema for every failure, and the handlers that enforce it.

Clients branch on ``error.code`` (stable, machine-readable) and quote ``error.request_id`` when
they report a problem; ``message`` is for humans. Every exception that can reach the framework is
mapped here, so bad input never surfaces as an HTML page, a bare ``{"detail": ...}``, or a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope

from app.preprocessing import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from app.request_context import request_id_of

logger = logging.getLogger("defect.errors")


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable error code.", examples=["corrupt_image"])
    message: str = Field(description="Human-readable explanation.")
    request_id: str | None = Field(
        default=None, description="Echo of the X-Request-ID of the request."
    )
    details: Any = Field(
        default=None, description="Optional structured details (e.g. invalid fields)."
    )


class ErrorResponse(BaseModel):
    """The body of every non-2xx response."""

    error: ErrorInfo


class ApiError(Exception):
    """An expected failure with its HTTP status and error code."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


IMAGE_ERROR_STATUS: dict[type[ImageError], int] = {
    UnsupportedImageError: 415,
    CorruptImageError: 400,
    ImageTooLargeError: 422,
}


def image_error_status(error: ImageError) -> int:
    """HTTP status for an image that cannot become a model input."""
    for error_type, status in IMAGE_ERROR_STATUS.items():
        if isinstance(error, error_type):
            return status
    return 400


def api_error_from_image_error(error: ImageError) -> ApiError:
    return ApiError(image_error_status(error), error.code, str(error))


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "not_ready",
}


def error_body(
    code: str, message: str, request_id: str | None, details: Any = None
) -> dict[str, Any]:
    return {
        "error": {"code": code, "message": message, "request_id": request_id, "details": details}
    }


def error_response(
    scope: Scope,
    status_code: int,
    code: str,
    message: str,
    *,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Build the JSON error response for a request (request id taken from its scope)."""
    request_id = request_id_of(scope)
    body = json.dumps(error_body(code, message, request_id, details)).encode()
    response = Response(body, status_code=status_code, media_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    if request_id is not None:
        response.headers["X-Request-ID"] = request_id
    return response


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Field errors without the offending input (it may be a multi-MB upload)."""
    details = []
    for error in exc.errors():
        details.append(
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "msg": str(error.get("msg", "")),
                "type": str(error.get("type", "")),
            }
        )
    return details


def _validation_message(details: list[dict[str, Any]]) -> str:
    parts = []
    for detail in details:
        location = ".".join(detail["loc"])
        parts.append(f"{location}: {detail['msg']}" if location else detail["msg"])
        if detail["loc"][:1] == ["body"] and detail["type"] == "missing":
            parts[-1] += " (send multipart/form-data with the image in this field)"
    return "; ".join(parts) or "invalid request"


async def _handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(
        request.scope,
        exc.status_code,
        exc.code,
        exc.message,
        details=exc.details,
        headers=exc.headers,
    )


async def _handle_image_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ImageError)
    return error_response(request.scope, image_error_status(exc), exc.code, str(exc))


async def _handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = _validation_details(exc)
    return error_response(
        request.scope, 422, "validation_error", _validation_message(details), details=details
    )


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(
        request.scope, exc.status_code, code, message, headers=dict(exc.headers or {})
    )


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.error(
        "unhandled error",
        exc_info=exc,
        extra={"fields": {"request_id": request_id_of(request.scope)}},
    )
    return error_response(
        request.scope, 500, "internal_error", "internal error; quote the request id to report it"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(ImageError, _handle_image_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)


def _example(status: int, code: str, message: str) -> dict[str, Any]:
    return {
        "model": ErrorResponse,
        "description": message,
        "content": {
            "application/json": {
                "example": error_body(code, message, "3f2c9a0e6b1d4c7e8a5f0b9d2e4c6a81")
            }
        },
    }


COMMON_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    500: _example(500, "internal_error", "Unexpected server error (never caused by input)."),
}

PREDICT_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _example(
        400,
        "corrupt_image",
        "The image is corrupt or truncated, or the multipart body is malformed (code bad_request).",
    ),
    413: _example(413, "payload_too_large", "The request body exceeds DEFECT_MAX_BODY_BYTES."),
    415: _example(
        415, "unsupported_media_type", "The content is not a supported image (decided by content)."
    ),
    422: _example(
        422,
        "validation_error",
        "Bad parameters or missing file field "
        "(validation_error, unknown_operating_point, conflicting_parameters, "
        "too_many_files) or too many pixels (image_too_large).",
    ),
    503: _example(
        503,
        "not_ready",
        "Model not loaded/verified (not_ready), or the queue is "
        "full (queue_full, with Retry-After).",
    ),
    **COMMON_ERROR_RESPONSES,
}
