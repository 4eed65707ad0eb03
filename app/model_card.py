"""Reading and checking ``model_card.json`` (docs/model-contract.md, schema_version 1).

Only the fields the service acts on are typed; everything else in the card is kept verbatim for
``GET /model``. A card that cannot drive the service is rejected with a reason that names the
field, because "not ready" is only useful to an operator if it says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.preprocessing import InputSpec

SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
CARD_FILE = "model_card.json"


class CardError(ValueError):
    """The card is missing, unreadable, or does not describe a model the service can run."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class CardInput(_Lenient):
    name: str
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: int = Field(gt=0)
    color_mode: Literal["rgb", "grayscale"]
    dtype: str = "float32"
    layout: Literal["NHWC"] = "NHWC"

    @model_validator(mode="after")
    def _channels_match_mode(self) -> CardInput:
        expected = 3 if self.color_mode == "rgb" else 1
        if self.channels != expected:
            raise ValueError(f"color_mode {self.color_mode!r} needs {expected} channels")
        return self


class CardOutput(_Lenient):
    name: str


class CardOutputs(_Lenient):
    probabilities: CardOutput
    heatmap: CardOutput


class OperatingPoint(_Lenient):
    threshold: float = Field(ge=0.0, le=1.0)
    description: str = ""


class CardOnnx(_Lenient):
    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class GoldenSample(_Lenient):
    file: str
    sha256: str | None = None
    input_sha256: str | None = None
    label: str | None = None
    probabilities: list[float]
    heatmap_max: float | None = None
    tolerance: float = Field(default=1e-4, gt=0)


class ModelCard(_Lenient):
    schema_version: int
    name: str
    version: str
    class_names: list[str] = Field(min_length=2)
    defect_class: str
    input: CardInput
    outputs: CardOutputs
    operating_points: dict[str, OperatingPoint] = Field(min_length=1)
    default_operating_point: str
    onnx: CardOnnx
    golden_samples: list[GoldenSample] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported "
                f"(this service reads {sorted(SUPPORTED_SCHEMA_VERSIONS)})"
            )
        if self.defect_class not in self.class_names:
            raise ValueError(f"defect_class {self.defect_class!r} is not in class_names")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        if self.default_operating_point not in self.operating_points:
            raise ValueError(
                f"default_operating_point {self.default_operating_point!r} is not one of "
                f"{sorted(self.operating_points)}"
            )
        for sample in self.golden_samples:
            if len(sample.probabilities) != len(self.class_names):
                raise ValueError(f"golden sample {sample.file}: one probability per class needed")
        return self

    @property
    def defect_index(self) -> int:
        return self.class_names.index(self.defect_class)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(
            width=self.input.width, height=self.input.height, color_mode=self.input.color_mode
        )


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        parts.append(f"{location}: {item['msg']}" if location else item["msg"])
    return "; ".join(parts)


def parse_card(raw: dict[str, Any]) -> ModelCard:
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise CardError(f"model card is invalid: {_describe(exc)}") from exc


def read_card(model_dir: Path) -> tuple[ModelCard, dict[str, Any]]:
    """Return the typed card and the raw JSON (shown verbatim by ``GET /model``)."""
    path = model_dir / CARD_FILE
    if not model_dir.is_dir():
        raise CardError(f"model directory {model_dir} does not exist (set DEFECT_MODEL_DIR)")
    if not path.is_file():
        raise CardError(f"no {CARD_FILE} in {model_dir}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise CardError(f"{path} must hold a JSON object")
    return parse_card(raw), raw
