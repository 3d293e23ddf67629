"""The signed model package: weights + manifest + classes + run record in one zip, verified before any use."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from magnet_core.cohort.data import DataError
from magnet_core.cohort.manifest import ConsortiumManifest
from magnet_core.model.config import GraphConfig, ModelConfig

FORMAT = "magnet-fl-model-package"
FORMAT_VERSION = 2  # 2: names its run (1: run unnamed, still read)
METADATA, SIGNATURE = "metadata.json", "signature.json"
ALLOWED_DTYPES = ("<f4", "<f8", "<i8")  # raw little-endian arrays only: nothing in a package is ever unpickled
MAX_METADATA_BYTES = 256 * 2**20
VERSIONED = ("magnet-fl", "torch", "torch-geometric", "numpy", "pandas", "pydantic", "cryptography", "flwr")


class PackageError(DataError):
    """A model package that must not be used: unreadable, unsigned, tampered with, or for another consortium."""


# ------------------------------------------------------------------------------------------- canonical JSON


def _finite(obj: Any) -> Any:
    """NaN/inf -> None (JSON has no such numbers), tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def canonical_json(obj: Any) -> bytes:
    """UTF-8 JSON with sorted keys and no whitespace: the same data always give the same bytes (paths and other
    non-JSON values as their text)."""
    return json.dumps(_finite(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=str).encode("utf-8")


def fingerprint(obj: Any) -> str:
    """sha256 (hex) of :func:`canonical_json`: the run configuration's fingerprint."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def array_digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ metadata


class ArrayInfo(BaseModel):
    """One weight array: its parameter name, dtype, shape and the sha256 of its raw bytes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    dtype: Literal["<f4", "<f8", "<i8"]
    shape: list[Annotated[int, Field(ge=0)]]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))


class PackageMetadata(BaseModel):
    """Everything a site needs to know about the model it receives (the signed part of the package)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["magnet-fl-model-package"] = FORMAT
    format_version: Literal[1, 2] = FORMAT_VERSION
    created: str = Field(description="UTC time the package was written (ISO 8601)")
    run: str | None = Field(None, min_length=1, max_length=200,
                            description="the run the weights come from (format 2 on; format 1 did not name it)")
    method: str = Field("federated", description="what produced the weights: federated, centralized, ...")
    manifest: ConsortiumManifest
    manifest_sha256: str = Field(description="fingerprint of the manifest")
    classes: list[str] = Field(min_length=2, description="class names, index = model output")
    preset: str
    model: ModelConfig
    graph: GraphConfig
    run_config: dict[str, Any]
    run_fingerprint: str = Field(description="sha256 of the canonical JSON of run_config")
    round: int | None = Field(None, ge=0, description="the federated round the weights come from")
    metrics: dict[str, float | None] = Field(default_factory=dict, description="global metrics of that round")
    versions: dict[str, str] = Field(default_factory=dict)
    weights: list[ArrayInfo] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "PackageMetadata":
        if self.format_version >= 2 and self.run is None:
            raise ValueError("a format 2 package names its run")
        try:
            created = dt.datetime.fromisoformat(self.created)
        except ValueError:
            raise ValueError(f"created {self.created!r} is not an ISO 8601 time") from None
        if created.tzinfo is None:
            raise ValueError(f"created {self.created!r} has no time zone")
        if self.classes != self.manifest.classes:
            raise ValueError(f"classes {self.classes} differ from the manifest's {self.manifest.classes}")
        if self.run_fingerprint != fingerprint(self.run_config):
            raise ValueError("run_fingerprint is not the sha256 of the run configuration")
        if self.manifest_sha256 != fingerprint(self.manifest.model_dump(mode="json")):
            raise ValueError("manifest_sha256 is not the fingerprint of the manifest")
        names = [w.name for w in self.weights]
        if len(set(names)) != len(names):
            raise ValueError("a weight array is listed twice")
        return self

    @property
    def in_dims(self) -> dict[str, int]:
        """Input width per modality, in the model's (= manifest's) modality order."""
        return {m.name: len(m.features) for m in self.manifest.modalities}


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------ keys and signing

def load_signing_key(key) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 private key from a key object, PEM bytes or a PEM file (``magnet-fl pki signing-key``)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    data = _read_bytes(key, "signing key")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{_label(key)}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise PackageError(f"{_label(key)}: the signing key must be Ed25519, got {type(loaded).__name__}")
    return loaded


def load_certificate(cert) -> x509.Certificate:
    """An X.509 certificate from an object, PEM bytes or a PEM file."""
    if isinstance(cert, x509.Certificate):
        return cert
    data = _read_bytes(cert, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PackageError(f"{_label(cert)}: not a PEM certificate ({exc})") from None


def _label(obj) -> str:
    return str(obj) if isinstance(obj, (str, os.PathLike)) else "<in memory>"


def _read_bytes(obj, what: str) -> bytes:
    if isinstance(obj, bytes):
        return obj
    path = Path(obj)
    if not path.is_file():
        raise PackageError(f"{path}: {what} not found")
    return path.read_bytes()


def sign(data: bytes, key) -> bytes:
    """Ed25519 signature of ``data``."""
    return load_signing_key(key).sign(data)


def _subject(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def check_signer(signer_cert, ca_cert, now: dt.datetime | None = None) -> x509.Certificate:
    """The signer certificate must be issued by the consortium CA, valid now, Ed25519, not a CA, and meant for
    signing: key usage digital signature and extended key usage code signing, both present. Returns it; raises
    PackageError otherwise."""
    cert, ca = load_certificate(signer_cert), load_certificate(ca_cert)
    who = f"signer certificate {_subject(cert)!r}"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PackageError(f"{who} was not issued by the consortium CA {_subject(ca)!r}: the package does not "
                           f"come from this consortium's coordinator") from None
    now = now or dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PackageError(f"{who} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                           f"{cert.not_valid_after_utc:%Y-%m-%d})")
    if not isinstance(cert.public_key(), ed25519.Ed25519PublicKey):
        raise PackageError(f"{who} does not hold an Ed25519 key")
    ext = cert.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise PackageError(f"{who} is a CA certificate, not a signing certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = ext.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise PackageError(f"{who} carries no key usage: a signing certificate must allow digital signatures "
                           f"(as `magnet-fl pki signing-key` issues it)") from None
    if not usage.digital_signature:
        raise PackageError(f"{who} is not allowed to make digital signatures (key usage)")
    try:
        purposes = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise PackageError(f"{who} carries no extended key usage: a signing certificate must be for code "
                           f"signing (as `magnet-fl pki signing-key` issues it)") from None
    if ExtendedKeyUsageOID.CODE_SIGNING not in purposes:
        raise PackageError(f"{who} is not a code/content-signing certificate (extended key usage)")
    return cert


def verify(data: bytes, signature: bytes, signer_cert, ca_cert) -> x509.Certificate:
    """Check ``signature`` over ``data`` with a signer certificate chained to the consortium CA."""
    cert = check_signer(signer_cert, ca_cert)
    try:
        cert.public_key().verify(signature, data)  # type: ignore[union-attr]
    except InvalidSignature:
        raise PackageError(f"the signature of {_subject(cert)!r} does not match the package contents: it was "
                           f"modified after signing") from None
    return cert


# -------------------------------------------------------------------------------------------------- package


@dataclasses.dataclass
class ModelPackage:
    """A verified package: its metadata, weights (name -> array, in model order) and who signed it."""

    metadata: PackageMetadata
    params: dict[str, np.ndarray]
    signer: str
    path: Path | None = None

    @property
    def manifest(self) -> ConsortiumManifest:
        return self.metadata.manifest

    def build_model(self):
        """The MAGNET model with these weights (eval mode); a clear error when they do not fit the architecture."""
        import torch

        from magnet_core.model.network import MAGNET

        model = MAGNET(self.metadata.in_dims, len(self.metadata.classes), self.metadata.model)
        try:
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.params.items()}, strict=True)
        except RuntimeError as exc:
            raise PackageError(f"{self.path or 'package'}: its weights do not fit the model its metadata "
                               f"describes: {str(exc).splitlines()[0]}") from None
        return model.eval()


def _member(i: int) -> str:
    return f"weights/{i:05d}.npy"


def write_package(path: str | Path, params: Mapping[str, np.ndarray], *, manifest: ConsortiumManifest, preset: str,
                  model_cfg: ModelConfig, graph_cfg: GraphConfig, run_config: Mapping[str, Any],
                  signing_key, signing_cert, round: int | None = None,
                  metrics: Mapping[str, float | None] | None = None, method: str = "federated",
                  run: str | None = None) -> Path:
    """Write and sign a model package (a zip: metadata.json, signature.json, weights/*.npy raw arrays).

    The package names its ``run`` (default: the first 16 hex digits of the run configuration's fingerprint), its
    ``round`` and the time it was written, so that a site can require a given or the newest one. The signature
    covers metadata.json, which holds each array's sha256: changing any weight or any metadata byte makes
    :func:`read_package` refuse the file."""
    key, cert = load_signing_key(signing_key), load_certificate(signing_cert)
    if cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) != \
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw):
        raise PackageError(f"{_label(signing_cert)}: this certificate is not the signing key's certificate")
    arrays, infos = [], []
    for name, value in params.items():
        a = np.asarray(value)
        if a.dtype.kind == "f":
            a = a.astype("<f4" if a.dtype.itemsize <= 4 else "<f8")
        elif a.dtype.kind in "iu":
            a = a.astype("<i8")
        else:
            raise PackageError(f"weight {name!r} has dtype {a.dtype}; only float and integer arrays are packaged")
        a = np.ascontiguousarray(a)
        arrays.append(a)
        infos.append(ArrayInfo(name=name, dtype=a.dtype.str, shape=list(a.shape), sha256=array_digest(a)))
    run_config = json.loads(canonical_json(dict(run_config)))
    try:
        meta = PackageMetadata(
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), method=method,
            run=run or fingerprint(run_config)[:16],
            manifest=manifest, manifest_sha256=fingerprint(manifest.model_dump(mode="json")),
            classes=list(manifest.classes), preset=preset, model=model_cfg, graph=graph_cfg, run_config=run_config,
            run_fingerprint=fingerprint(run_config), round=round, metrics=_finite(dict(metrics or {})),
            versions=library_versions(), weights=infos)
    except ValidationError as exc:
        raise PackageError(f"cannot describe this model as a package:\n{exc}") from None
    meta_bytes = canonical_json(meta.model_dump(mode="json"))
    signature = {"algorithm": "Ed25519", "signature": base64.b64encode(key.sign(meta_bytes)).decode(),
                 "certificate": cert.public_bytes(serialization.Encoding.PEM).decode()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(METADATA, meta_bytes)
        zf.writestr(SIGNATURE, canonical_json(signature))
        for i, a in enumerate(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, allow_pickle=False)
            zf.writestr(_member(i), buf.getvalue())
    tmp.replace(path)
    return path


def _open(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise PackageError(f"{path}: model package not found")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageError(f"{path}: not a model package (not a readable zip: {exc})") from None


def _read_member(zf: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise PackageError(f"{path}: not a model package (no {name})") from None
    if info.file_size > limit:
        raise PackageError(f"{path}: {name} is {info.file_size} bytes, more than expected ({limit})")
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise PackageError(f"{path}: {name} is larger than expected")
    return data


def read_package(path: str | Path, *, ca_cert, manifest: ConsortiumManifest | None = None) -> ModelPackage:
    """Open a package only if its signature verifies against the consortium CA and nothing was changed.

    Order: signer certificate chained to ``ca_cert``; signature over metadata.json; metadata schema; every weight
    array (raw, never unpickled) against its dtype, shape and sha256; exactly the listed files present; and, when
    the site gives its ``manifest``, the same modalities, features, order, scaling and classes. Any failure raises
    :class:`PackageError` saying what is wrong."""
    path = Path(path)
    with _open(path) as zf:
        try:
            sig = json.loads(_read_member(zf, SIGNATURE, 1 << 20, path))
            signature = base64.b64decode(sig["signature"], validate=True)
            cert_pem = str(sig["certificate"]).encode()
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"{path}: signature.json is malformed ({exc})") from None
        if sig.get("algorithm") != "Ed25519":
            raise PackageError(f"{path}: unsupported signature algorithm {sig.get('algorithm')!r}")
        meta_bytes = _read_member(zf, METADATA, MAX_METADATA_BYTES, path)
        cert = verify(meta_bytes, signature, cert_pem, ca_cert)
        try:
            meta = PackageMetadata.model_validate_json(meta_bytes)
        except ValidationError as exc:
            raise PackageError(f"{path}: signed but invalid metadata:\n{exc}") from None
        expected = {METADATA, SIGNATURE} | {_member(i) for i in range(len(meta.weights))}
        extra = sorted(set(zf.namelist()) - expected)
        if extra:
            raise PackageError(f"{path}: unexpected file(s) in the package: {extra[:5]}")
        params = {}
        for i, info in enumerate(meta.weights):
            raw = _read_member(zf, _member(i), info.nbytes + 4096, path)
            try:
                a = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise PackageError(f"{path}: weight {info.name!r} cannot be read as a raw array ({exc})") from None
            if a.dtype.str != info.dtype or list(a.shape) != info.shape:
                raise PackageError(f"{path}: weight {info.name!r} is {a.dtype.str} {list(a.shape)}, the signed "
                                   f"metadata says {info.dtype} {info.shape}")
            if array_digest(a) != info.sha256:
                raise PackageError(f"{path}: weight {info.name!r} was modified after signing (sha256 differs "
                                   f"from the signed metadata)")
            params[info.name] = a
    if manifest is not None:
        problems = manifest_differences(meta.manifest, manifest)
        if problems:
            raise PackageError(f"{path}: the package was trained for another manifest than this site's:\n- "
                               + "\n- ".join(problems[:10]))
    return ModelPackage(meta, params, _subject(cert), path)


class PackageStamp(BaseModel):
    """What identifies a package in time: its run, round and creation time (and the file's sha256)."""

    model_config = ConfigDict(extra="forbid")

    run: str | None
    round: int | None
    created: str
    sha256: str = ""

    @classmethod
    def of(cls, meta: PackageMetadata, sha256: str = "") -> "PackageStamp":
        return cls(run=meta.run, round=meta.round, created=meta.created, sha256=sha256)

    def describe(self) -> str:
        return f"run {self.run or '(unnamed)'}, round {self.round if self.round is not None else '-'}, " \
               f"written {self.created}"


def require_identity(meta: PackageMetadata, run: str | None = None, round: int | None = None,
                     newest: PackageStamp | None = None) -> None:
    """PackageError naming what differs when the package is not from ``run``, not from ``round``, or older than
    ``newest`` (the newest package this site used: written earlier, or an earlier round of the same run)."""
    this = PackageStamp.of(meta)
    if run is not None and meta.run != run:
        raise PackageError(f"the package is from {this.describe()}; this site requires run {run}")
    if round is not None and meta.round != round:
        raise PackageError(f"the package is from {this.describe()}; this site requires round {round}")
    if newest is None:
        return
    written, latest = dt.datetime.fromisoformat(meta.created), dt.datetime.fromisoformat(newest.created)
    earlier_round = meta.run == newest.run and (meta.round or 0) < (newest.round or 0)
    if written < latest or earlier_round:
        raise PackageError(f"the package is older than the newest this site has used: it is from "
                           f"{this.describe()}; the newest is from {newest.describe()}")


def manifest_from_cohort(cohort, classes: list[str] | None = None, name: str | None = None) -> ConsortiumManifest:
    """The manifest of a simulated or centralized run (no prepared manifest): the cohort's modalities and features in
    model order, no preprocessing values (the data are used as loaded), classes ``class0..`` unless named."""
    from magnet_core.cohort.manifest import ModalitySpec

    return ConsortiumManifest(name=name or str(cohort.name).replace("/", "-"),
                              classes=list(classes or [f"class{k}" for k in range(cohort.num_classes)]),
                              modalities=[ModalitySpec(name=m, features=list(cohort.features[m]))
                                          for m in cohort.modalities])


def manifest_differences(package: ConsortiumManifest, site: ConsortiumManifest) -> list[str]:
    """What differs between the package's manifest and the site's (empty when they agree on everything the model
    depends on: classes, label column, modalities and their order, features and their order, preprocessing)."""
    out = []
    if package.classes != site.classes:
        out.append(f"classes: package {package.classes}, site {site.classes}")
    if package.label_column != site.label_column:
        out.append(f"label column: package {package.label_column!r}, site {site.label_column!r}")
    pm, sm = [m.name for m in package.modalities], [m.name for m in site.modalities]
    if pm != sm:
        out.append(f"modalities: package {pm}, site {sm}")
    for spec in package.modalities:
        if spec.name not in sm:
            continue
        other = site.modality(spec.name)
        if spec.features != other.features:
            if len(spec.features) != len(other.features):
                out.append(f"modality {spec.name!r}: package has {len(spec.features)} features, site "
                           f"{len(other.features)}")
            else:
                i = next(i for i, (a, b) in enumerate(zip(spec.features, other.features)) if a != b)
                out.append(f"modality {spec.name!r}: feature {i + 1} is {spec.features[i]!r} in the package, "
                           f"{other.features[i]!r} at the site")
        for key in ("impute_means", "scale_min", "scale_max"):
            a, b = getattr(spec, key), getattr(other, key)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(np.asarray(a), np.asarray(b))):
                out.append(f"modality {spec.name!r}: {key} differ (different preprocessing)")
    if package.missing_feature != site.missing_feature:
        out.append(f"missing_feature: package {package.missing_feature!r}, site {site.missing_feature!r}")
    return out
