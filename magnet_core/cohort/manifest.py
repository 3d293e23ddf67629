"""The consortium manifest: modalities, their feature names and order, the label set, and shared preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import tomllib
from cryptography.hazmat.primitives import serialization
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from magnet_core.cohort.errors import DataError
from magnet_core.cohort.limits import DEFAULT_INPUT_LIMITS, InputLimits

DEFAULT_MIN_COUNT = 5  # the consortium's minimum number of patients behind anything a site releases
DEFAULT_SEED = 10  # the one default seed (splits, runs); magnet_core.consortium.methods.DEFAULT_SEEDS start here
MIN_COUNT_FLOOR = 3  # a manifest may not set k below this
DEFAULT_MAX_ABSENT_FEATURES = 0.1  # a site may lack (and fill) at most this share of a modality's features
DEFAULT_SCALE_TOLERANCE = 1.0  # prepared values may lie this far outside [0, 1] (test patients are not clipped)
DEFAULT_MAX_OUT_OF_RANGE = 0.01  # share of a modality's cells allowed beyond that tolerance


class ModalitySpec(BaseModel):
    """One modality: its feature names in the order the model expects, and optional preprocessing."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    features: list[str] = Field(min_length=1)
    # Consortium-wide preprocessing (from `magnet-fl prepare`), applied by every site in this order:
    impute_means: list[float] | None = Field(None, description="per-feature value used for missing cells")
    scale_min: list[float] | None = Field(None, description="per-feature minimum for min-max scaling")
    scale_max: list[float] | None = Field(None, description="per-feature maximum for min-max scaling")

    @model_validator(mode="after")
    def _check(self) -> "ModalitySpec":
        seen = set()
        for f in self.features:
            if f in seen:
                raise ValueError(f"modality {self.name!r}: feature {f!r} is listed twice")
            seen.add(f)
        for key in ("impute_means", "scale_min", "scale_max"):
            values = getattr(self, key)
            if values is not None and len(values) != len(self.features):
                raise ValueError(f"modality {self.name!r}: {key} has {len(values)} values for "
                                 f"{len(self.features)} features")
        return self


def public_key_der(key: str | bytes) -> bytes:
    """A public key given as an OpenSSH line or PEM, as DER SubjectPublicKeyInfo (one spelling per key), so that the
    manifest's key and the key Flower's node authentication registered compare equal. ValueError otherwise."""
    data = (key.encode() if isinstance(key, str) else bytes(key)).strip()
    try:
        loaded = (serialization.load_pem_public_key(data) if data.startswith(b"-----BEGIN")
                  else serialization.load_ssh_public_key(data))
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"not an OpenSSH or PEM public key ({type(exc).__name__}: {str(exc)[:80]})") from None
    except Exception as exc:  # noqa: BLE001 - cryptography raises UnsupportedAlgorithm for unknown key types
        raise ValueError(f"not a usable public key ({type(exc).__name__})") from None
    return loaded.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class EnrolledSite(BaseModel):
    """What a site enrolled with (from its validate-site report): upper bounds the coordinator checks replies by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: int = Field(ge=0, strict=True, description="training patients (train + validation split)")
    test: int = Field(ge=0, strict=True, description="test patients")
    modalities: dict[str, int] = Field(default_factory=dict, description="training patients holding each modality")
    public_key: str | None = Field(
        None, exclude_if=lambda v: v is None,
        description="the public key of the site's node (OpenSSH line or PEM; what `flwr supernode register` was "
                    "given): the coordinator binds the site's name to the node holding it")

    @field_validator("public_key")
    @classmethod
    def _a_public_key(cls, value: str | None) -> str | None:
        if value is not None:
            public_key_der(value)
        return value


class ConsortiumManifest(BaseModel):
    """What every site's data must look like before it may train with the consortium."""

    model_config = ConfigDict(extra="forbid")

    name: str = "consortium"
    classes: list[str] = Field(min_length=2, description="class names; labels are their indices 0..C-1")
    label_column: str = "Class"
    modalities: list[ModalitySpec] = Field(min_length=1)
    missing_feature: Literal["error", "impute"] = Field(
        "error", description="a site lacking a listed feature: refuse, or fill it with impute_means")
    max_absent_features: float = Field(
        DEFAULT_MAX_ABSENT_FEATURES, ge=0, le=1,
        description="with missing_feature = 'impute': refuse a site lacking more than this share of a modality's "
                    "features (a renamed or another consortium's file would otherwise be all consortium means)")
    scale_tolerance: float = Field(
        DEFAULT_SCALE_TOLERANCE, ge=0,
        description="prepared (min-max scaled) values may lie this far outside [0, 1]")
    max_out_of_range: float = Field(
        DEFAULT_MAX_OUT_OF_RANGE, ge=0, le=1,
        description="refuse a modality with more than this share of cells beyond scale_tolerance (raw, unscaled "
                    "values); fewer are reported as a warning")
    min_count: int = Field(
        DEFAULT_MIN_COUNT, ge=MIN_COUNT_FLOOR,
        description="k: a site releases no statistic that describes fewer than k patients")
    sites: dict[str, EnrolledSite] = Field(
        default_factory=dict, description="enrolled sites by name; replies are bounded by these counts")
    input_limits: InputLimits = Field(
        default_factory=InputLimits, description="size limits of every site table file, checked before parsing "
        "(decompressed bytes, rows, columns, cells, line length); raise them for larger cohorts")

    @model_validator(mode="after")
    def _unique_modalities(self) -> "ConsortiumManifest":
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        return self

    @model_serializer(mode="wrap")
    def _limits_only_when_set(self, handler):
        """Default input limits are left out of every dump (TOML, JSON, fingerprints), so the manifests, packages and
        fingerprints written before the limits existed stay what they were."""
        data = handler(self)
        if self.input_limits == DEFAULT_INPUT_LIMITS and isinstance(data, dict):
            data.pop("input_limits", None)
        return data

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path) -> "ConsortiumManifest":
        """Read and validate a TOML manifest; errors name the file."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: manifest not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise DataError(f"{path}: not valid TOML ({exc})") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise DataError(f"{path}: invalid manifest:\n{exc}") from None

    def save(self, path: str | Path) -> Path:
        import tomli_w

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(self.model_dump(exclude_none=True)))
        return path
