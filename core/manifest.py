"""The manifest schema (models/manifest.json), versioned. `prune-train` writes it; the service
validates it with this model before touching any checkpoint, so a malformed value is reported with
its place and reason instead of failing somewhere later."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.model import TTA_LEVELS

SCHEMA_VERSION = 1


class Normalization(BaseModel):
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(not s > 0 for s in value):
            raise ValueError("every std must be > 0")
        return value


class VariantEntry(BaseModel):
    """One servable variant. Extra keys (validation accuracy, timing, ...) are kept, not checked."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=200)
    keep: float = Field(gt=0, le=1, allow_inf_nan=False)
    sparsity: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False)
    granularity: Literal["weight", "channel"] = "weight"
    criterion: str = "gate"
    file: str = Field(min_length=1)
    bytes: int | None = Field(None, ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    params: dict[str, int]
    finetuned: bool = False
    base: str | None = None
    test_acc_mean: float = Field(ge=0, le=100, allow_inf_nan=False)
    test_acc_std: float = Field(ge=0, allow_inf_nan=False)
    test_acc_per_seed: list[float] = []
    test_acc_no_tta_mean: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    # Test accuracy at each TTA level (core.model.TTA_LEVELS), which a request may choose.
    test_acc_tta0_mean: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    test_acc_tta1_mean: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    test_acc_tta2_mean: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    drop: float = Field(ge=-100, le=100, allow_inf_nan=False)

    def test_acc_by_tta(self) -> dict[int, float]:
        """The recorded test accuracy per TTA level (manifests before per-level figures: level 0 only)."""
        recorded = {level: getattr(self, f"test_acc_tta{level}_mean") for level in TTA_LEVELS}
        if recorded[0] is None:
            recorded[0] = self.test_acc_no_tta_mean
        return {level: acc for level, acc in recorded.items() if acc is not None}

    @field_validator("params")
    @classmethod
    def _counts(cls, value: dict[str, int]) -> dict[str, int]:
        if any(v < 0 for v in value.values()):
            raise ValueError("parameter counts must be ≥ 0")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: Literal[1] = SCHEMA_VERSION
    classes: list[str] = Field(min_length=2)
    normalization: Normalization
    tta: int = 0
    variants: list[VariantEntry] = Field(min_length=1)

    @field_validator("tta")
    @classmethod
    def _tta(cls, value: int) -> int:
        if value not in TTA_LEVELS:
            raise ValueError(f"tta must be one of {TTA_LEVELS}")
        return value

    @model_validator(mode="after")
    def _unique(self) -> Manifest:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        points = [(v.granularity, round(v.keep, 9)) for v in self.variants]
        if len(set(points)) != len(points):
            raise ValueError("two variants share a granularity and keep (requests could not tell them apart)")
        return self


def describe_error(exc: ValidationError) -> str:
    """One line naming every bad field and why, e.g. "variants.3.keep: Input should be a valid number
    (got 'half')"."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "manifest"
        got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict | list) else ""
        parts.append(f"{where}: {error['msg']}{got}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
