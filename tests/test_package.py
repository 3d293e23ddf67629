"""Model package: signed by a key chained to the consortium CA; any changed weight or metadata byte is refused."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from magnet_core.artefacts.model_package import (
    PackageError,
    PackageStamp,
    canonical_json,
    fingerprint,
    manifest_differences,
    read_package,
    require_identity,
    sign,
    verify,
    write_package,
)
from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec
from magnet_core.model.config import GraphConfig, ModelConfig
from magnet_core.model.network import build_model


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(tmp_path, tag: str = "", usage=ExtendedKeyUsageOID.CODE_SIGNING, key_usage: bool = True):
    """A consortium CA (EC P-384, as `magnet-fl pki init`) and an Ed25519 signing certificate it issues, as
    `magnet-fl pki signing-key` does: key usage digital signature + content commitment (left out if not
    ``key_usage``), extended key usage ``usage`` (left out if None). Returns (ca.crt, signing key, cert) paths."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"test CA{tag}")).issuer_name(_name(f"test CA{tag}"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ed25519.Ed25519PrivateKey.generate()
    cert = (x509.CertificateBuilder().subject_name(_name("model signing")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if usage is not None:
        cert = cert.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if key_usage:
        cert = cert.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
    cert = cert.sign(ca_key, hashes.SHA384())
    d = tmp_path / f"pki{tag}"
    d.mkdir()
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "model_signing.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    (d / "model_signing.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "ca.crt", d / "model_signing.key", d / "model_signing.crt"


def small_manifest() -> ConsortiumManifest:
    return ConsortiumManifest(name="toy", classes=["low", "high"], modalities=[
        ModalitySpec(name="mRNA", features=["g1", "g2", "g3", "g4"]),
        ModalitySpec(name="miRNA", features=["m1", "m2", "m3"], scale_min=[0, 0, 0], scale_max=[1, 2, 3])])


MODEL = ModelConfig(hidden=8, heads=2, dropout=0.0)


def _package(tmp_path, pki, name="model.magnet", manifest=None, **kw):
    manifest = manifest or small_manifest()
    model = build_model({m.name: len(m.features) for m in manifest.modalities}, 2, MODEL, seed=1)
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    _, key, cert = pki
    path = write_package(tmp_path / name, params, manifest=manifest, preset="ov", model_cfg=MODEL,
                         graph_cfg=GraphConfig(sparsity=0.8), run_config={"seed": 10, "rounds": 3, "lr": 1e-3},
                         signing_key=key, signing_cert=cert, round=3,
                         metrics={"mcc": 0.25, "auroc": float("nan")}, **kw)
    return path, params


def _rewrite(src, dst, edit):
    """Copy a package, passing every member's bytes through ``edit(name, data) -> data``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))
    return dst


def test_package_round_trip_carries_everything_a_site_needs(tmp_path):
    pki = make_pki(tmp_path)
    path, params = _package(tmp_path, pki)
    pkg = read_package(path, ca_cert=pki[0], manifest=small_manifest())
    assert list(pkg.params) == list(params)
    assert all(np.array_equal(pkg.params[k], v) for k, v in params.items())
    meta = pkg.metadata
    assert meta.classes == ["low", "high"] and meta.preset == "ov" and meta.round == 3
    assert meta.manifest == small_manifest() and meta.model == MODEL and meta.graph.sparsity == 0.8
    assert meta.run_fingerprint == hashlib.sha256(b'{"lr":0.001,"rounds":3,"seed":10}').hexdigest()
    assert meta.run_fingerprint == fingerprint({"seed": 10, "rounds": 3, "lr": 1e-3})
    assert meta.metrics == {"mcc": 0.25, "auroc": None}  # NaN stored as null (JSON has no NaN)
    assert {"torch", "numpy", "python", "magnet-fl"} <= set(meta.versions)
    assert pkg.signer == "model signing"
    model = pkg.build_model()
    assert not model.training and model.modalities == ["mRNA", "miRNA"]
    with zipfile.ZipFile(path) as zf:  # raw arrays and JSON only: nothing a reader could unpickle
        names = zf.namelist()
        assert names[:2] == ["metadata.json", "signature.json"]
        assert all(n.startswith("weights/") and n.endswith(".npy") for n in names[2:])
        assert len(names) == 2 + len(params)


def test_one_changed_weight_is_refused(tmp_path):
    pki = make_pki(tmp_path)
    path, _ = _package(tmp_path, pki)

    def bump(name, data):
        if name != "weights/00003.npy":
            return data
        a = np.lib.format.read_array(io.BytesIO(data))
        a.flat[0] += 1e-3
        buf = io.BytesIO()
        np.lib.format.write_array(buf, a)
        return buf.getvalue()

    bad = _rewrite(path, tmp_path / "tampered.magnet", bump)
    with pytest.raises(PackageError, match="modified after signing"):
        read_package(bad, ca_cert=pki[0])


def test_an_edited_manifest_is_refused(tmp_path):
    pki = make_pki(tmp_path)
    path, _ = _package(tmp_path, pki)

    def rename_feature(name, data):
        return data.replace(b'"g2"', b'"g9"') if name == "metadata.json" else data

    bad = _rewrite(path, tmp_path / "tampered.magnet", rename_feature)
    with pytest.raises(PackageError, match="does not match the package contents"):
        read_package(bad, ca_cert=pki[0])
    extra = _rewrite(path, tmp_path / "extra.magnet", lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as zf:
        zf.writestr("weights/payload.npy", b"anything")
    with pytest.raises(PackageError, match="unexpected file"):
        read_package(extra, ca_cert=pki[0])


def test_a_package_of_another_consortium_or_key_is_refused(tmp_path):
    ours, theirs = make_pki(tmp_path, "A"), make_pki(tmp_path, "B")
    path, _ = _package(tmp_path, theirs)
    with pytest.raises(PackageError, match="not issued by the consortium CA"):
        read_package(path, ca_cert=ours[0])
    with pytest.raises(PackageError, match="not the signing key's certificate"):
        _package(tmp_path, (ours[0], ours[1], theirs[2]), name="mixed.magnet")
    tls = make_pki(tmp_path, "C", usage=ExtendedKeyUsageOID.SERVER_AUTH)  # a certificate not meant for signing
    path, _ = _package(tmp_path, tls, name="tls.magnet")
    with pytest.raises(PackageError, match="not a code/content-signing certificate"):
        read_package(path, ca_cert=tls[0])
    with pytest.raises(PackageError, match="not a model package"):
        read_package(ours[0], ca_cert=ours[0])  # a PEM file is not a zip
    data = b"payload"
    assert verify(data, sign(data, ours[1]), ours[2], ours[0]).subject == \
        x509.load_pem_x509_certificate(ours[2].read_bytes()).subject
    with pytest.raises(PackageError, match="modified after signing"):
        verify(data + b"!", sign(data, ours[1]), ours[2], ours[0])


def test_a_signing_certificate_must_carry_the_signing_key_usages(tmp_path):
    """A certificate from the consortium CA without the key-usage extension (or without the extended one) signs no
    package a site accepts; `magnet-fl pki signing-key` issues both."""
    bare = make_pki(tmp_path, "bare", key_usage=False)
    path, _ = _package(tmp_path, bare, name="bare.magnet")
    with pytest.raises(PackageError, match="carries no key usage: a signing certificate must allow digital sign"):
        read_package(path, ca_cert=bare[0])
    no_purpose = make_pki(tmp_path, "nopurpose", usage=None)
    path, _ = _package(tmp_path, no_purpose, name="nopurpose.magnet")
    with pytest.raises(PackageError, match="carries no extended key usage"):
        read_package(path, ca_cert=no_purpose[0])
    from server.pki import init_ca, issue_signing_key

    init_ca(tmp_path / "real")
    key, cert = issue_signing_key(tmp_path / "real")
    path, _ = _package(tmp_path, (tmp_path / "real" / "ca" / "ca.crt", key, cert), name="real.magnet")
    assert read_package(path, ca_cert=tmp_path / "real" / "ca" / "ca.crt").signer == "magnet-fl model signing"


def _resigned(src, dst, pki, edit):
    """A package whose metadata ``edit(dict)`` changed, signed again with the consortium's own key (what an older
    release of magnet-fl, or the coordinator itself, could have written)."""
    meta = json.loads(zipfile.ZipFile(src).read("metadata.json"))
    edit(meta)
    data = canonical_json(meta)
    signature = json.loads(zipfile.ZipFile(src).read("signature.json"))
    signature["signature"] = base64.b64encode(sign(data, pki[1])).decode()
    return _rewrite(src, dst, lambda n, d: data if n == "metadata.json" else
                    canonical_json(signature) if n == "signature.json" else d)


def test_a_package_names_its_run_round_and_date_and_a_site_can_require_them(tmp_path):
    pki = make_pki(tmp_path)
    path, _ = _package(tmp_path, pki, run="flwr-run-42")
    meta = read_package(path, ca_cert=pki[0]).metadata
    assert meta.format_version == 2 and meta.run == "flwr-run-42" and meta.round == 3
    assert dt.datetime.fromisoformat(meta.created).tzinfo is not None
    unnamed = read_package(_package(tmp_path, pki, name="unnamed.magnet")[0], ca_cert=pki[0]).metadata
    assert unnamed.run == meta.run_fingerprint[:16]  # a package always names its run
    require_identity(meta, run="flwr-run-42", round=3)
    with pytest.raises(PackageError, match="the package is from run flwr-run-42, round 3, written .*; this site "
                                           "requires run flwr-run-43"):
        require_identity(meta, run="flwr-run-43")
    with pytest.raises(PackageError, match="requires round 5"):
        require_identity(meta, round=5)
    newest = PackageStamp(run="flwr-run-42", round=4, created=meta.created)
    with pytest.raises(PackageError, match="older than the newest this site has used"):
        require_identity(meta, newest=newest)  # an earlier round of the same run
    later = (dt.datetime.fromisoformat(meta.created) + dt.timedelta(seconds=1)).isoformat()
    with pytest.raises(PackageError, match="older than the newest"):
        require_identity(meta, newest=PackageStamp(run="another", round=1, created=later))
    require_identity(meta, newest=PackageStamp.of(meta))  # the same package again
    # a format-1 package (before packages named their run) is still read, but never matches a required run
    old = _resigned(path, tmp_path / "v1.magnet", pki, lambda m: (m.pop("run"), m.update(format_version=1)))
    v1 = read_package(old, ca_cert=pki[0]).metadata
    assert v1.run is None and v1.format_version == 2 - 1
    with pytest.raises(PackageError, match=r"run \(unnamed\)"):
        require_identity(v1, run="flwr-run-42")
    no_run = _resigned(path, tmp_path / "norun.magnet", pki, lambda m: m.pop("run"))
    with pytest.raises(PackageError, match="a format 2 package names its run"):
        read_package(no_run, ca_cert=pki[0])


def test_a_site_with_another_manifest_is_told_what_differs(tmp_path):
    pki = make_pki(tmp_path)
    path, _ = _package(tmp_path, pki)
    other = small_manifest().model_copy(deep=True)
    other.modalities[0].features[1] = "gX"
    other.modalities[1].scale_max = [1, 2, 4]
    with pytest.raises(PackageError, match="another manifest") as err:
        read_package(path, ca_cert=pki[0], manifest=other)
    assert "feature 2 is 'g2' in the package, 'gX' at the site" in str(err.value)
    assert "'miRNA': scale_max differ" in str(err.value)
    swapped = small_manifest().model_copy(update={"classes": ["high", "low"]})
    assert manifest_differences(small_manifest(), swapped) == ["classes: package ['low', 'high'], site "
                                                               "['high', 'low']"]
    assert manifest_differences(small_manifest(), small_manifest()) == []


def test_canonical_json_is_key_order_independent():
    assert canonical_json({"b": 1, "a": [1.5, None]}) == b'{"a":[1.5,null],"b":1}'
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1}) != fingerprint({"a": 2, "b": 2})
    assert json.loads(canonical_json({"x": float("inf")})) == {"x": None}


def test_a_federated_run_writes_a_signed_package_a_site_can_verify(tmp_path):
    """The ServerApp signs model.magnet with the coordinator's key (from `pki signing-key`); the package verifies
    against the consortium CA and carries the run's round, metrics and fingerprint."""
    from magnet_core.artefacts.model_package import read_package
    from server.config import FederatedConfig
    from server.pki import init_ca, issue_signing_key
    from simulations.engine import run_inprocess

    pki = tmp_path / "pki"
    init_ca(pki)
    key, cert = issue_signing_key(pki)
    cfg = FederatedConfig(num_server_rounds=1, local_epochs=1, data_path="generated:120", scenario="iid-2",
                          server_eval=False, out_dir=str(tmp_path / "run"), signing_key=str(key),
                          signing_cert=str(cert))
    params, history = run_inprocess(cfg, 2)
    package = read_package(tmp_path / "run" / "model.magnet", ca_cert=pki / "ca" / "ca.crt")
    assert package.metadata.round == 1
    assert package.metadata.run_config == json.loads(json.dumps(cfg.identity()))
    assert package.metadata.metrics["mcc"] == history[-1]["global"]["mcc"]
    for k, v in params.items():
        np.testing.assert_array_equal(package.params[k], v)


def test_a_fedproto_package_carries_no_class_prototypes(tmp_path):
    """The sites released their class means to the coordinator, not to every package user: the package holds the
    weights only (the prototypes never change a prediction) and builds a model without them."""
    from magnet_core.artefacts.model_package import read_package
    from server.config import FederatedConfig
    from server.pki import init_ca, issue_signing_key
    from simulations.engine import run_inprocess

    pki = tmp_path / "pki"
    init_ca(pki)
    key, cert = issue_signing_key(pki)
    cfg = FederatedConfig(num_server_rounds=1, local_epochs=1, data_path="generated:120", scenario="iid-2",
                          server_eval=False, out_dir=str(tmp_path / "run"), signing_key=str(key),
                          signing_cert=str(cert), prototype_weight=1.0)
    params, _ = run_inprocess(cfg, 2)
    assert "prototype_sum" in params and float(np.max(params["prototype_mass"])) == 1.0
    package = read_package(tmp_path / "run" / "model.magnet", ca_cert=pki / "ca" / "ca.crt")
    assert not any("prototype" in k for k in package.params)
    assert not package.metadata.model.prototypes
    model = package.build_model()
    for k, v in package.params.items():
        np.testing.assert_array_equal(v, params[k])
    assert set(model.state_dict()) == set(package.params)
