"""Query parameters of the prediction routes, parsed by hand, documented by hand.

Why not ``Query(...)`` parameters: FastAPI re-inspects their type annotations on every request,
which profiling showed to be the largest single framework cost of ``/predict`` on the event
loop (more than parsing the multipart body). Three scalars are cheap to validate directly; the
errors keep FastAPI's 422 shape (``loc``/``msg``/``type`` per field) and the OpenAPI entries
below keep ``/docs`` complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from app.errors import ApiError

_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})
MAX_OPERATING_POINT_LENGTH = 100


@dataclass(frozen=True, slots=True)
class PredictQuery:
    threshold: float | None
    operating_point: str | None
    heatmap: bool


def _error(name: str, message: str, kind: str) -> dict[str, Any]:
    return {"loc": ["query", name], "msg": message, "type": kind}


def parse_threshold(raw: str | None, errors: list[dict[str, Any]]) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        errors.append(_error("threshold", "Input should be a valid number", "float_parsing"))
        return None
    if not math.isfinite(value):
        errors.append(_error("threshold", "Input should be a finite number", "finite_number"))
    elif value < 0.0:
        errors.append(_error("threshold", "Input should be greater than or equal to 0", "ge"))
    elif value > 1.0:
        errors.append(_error("threshold", "Input should be less than or equal to 1", "le"))
    else:
        return value
    return None


def parse_bool(name: str, raw: str | None, errors: list[dict[str, Any]]) -> bool:
    if raw is None:
        return False
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered not in _FALSE:
        errors.append(_error(name, "Input should be a valid boolean (true/false)", "bool_parsing"))
    return False


def parse_operating_point(raw: str | None, errors: list[dict[str, Any]]) -> str | None:
    if raw is not None and not 0 < len(raw) <= MAX_OPERATING_POINT_LENGTH:
        errors.append(
            _error(
                "operating_point",
                f"Input should have 1 to {MAX_OPERATING_POINT_LENGTH} characters",
                "string_length",
            )
        )
        return None
    return raw


async def predict_query(request: Request) -> PredictQuery:
    """Dependency: the validated query of /predict and /predict/batch (422 on bad values)."""
    query = request.query_params
    errors: list[dict[str, Any]] = []
    parsed = PredictQuery(
        threshold=parse_threshold(query.get("threshold"), errors),
        operating_point=parse_operating_point(query.get("operating_point"), errors),
        heatmap=parse_bool("heatmap", query.get("heatmap"), errors),
    )
    if errors:
        message = "; ".join(f"query.{error['loc'][1]}: {error['msg']}" for error in errors)
        raise ApiError(422, "validation_error", message, details=errors)
    return parsed


PredictQueryDep = Annotated[PredictQuery, Depends(predict_query)]

OPENAPI_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "threshold",
        "in": "query",
        "required": False,
        "description": "Decision threshold on the defect probability (defect if p >= "
        "threshold). Mutually exclusive with operating_point.",
        "schema": {"type": "number", "minimum": 0, "maximum": 1},
        "example": 0.5,
    },
    {
        "name": "operating_point",
        "in": "query",
        "required": False,
        "description": "Named operating point from the model card (e.g. balanced, high_recall, "
        "default); GET /model lists them. Default: the card's default_operating_point.",
        "schema": {"type": "string", "maxLength": MAX_OPERATING_POINT_LENGTH},
        "example": "high_recall",
    },
    {
        "name": "heatmap",
        "in": "query",
        "required": False,
        "description": "Add the defect heatmap: a PNG overlay (base64), the box of the hottest "
        "region in original-image pixels, and the defect area fraction.",
        "schema": {"type": "boolean", "default": False},
    },
]
