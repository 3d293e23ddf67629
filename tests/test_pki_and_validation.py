"""Provisioning (CA, SuperLink certificate, site bundles) and site data validation against the manifest."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from magnet_core.cohort.data import DataError, load_cohort_dir
from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec
from magnet_core.cohort.validation import load_site_cohort, validate_site


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_pki_ca_server_certificate_and_site_bundle(tmp_path, capsys):
    pki, at_site = tmp_path / "pki", tmp_path / "hospital-a"
    out = _cli("pki", "init", "--dir", str(pki))  # the console entry point, in a process of its own
    assert out.returncode == 0, out.stderr
    from simulations.cli import main

    def pki_cli(*args):  # the same entry point in this process (a process per call costs seconds)
        code = main(["pki", *args])
        return subprocess.CompletedProcess(args, code, capsys.readouterr().out, "")
    out2 = pki_cli("server", "--dir", str(pki), "--host", "fl.example.org", "--host", "10.1.2.3")
    out3 = pki_cli("site-key", "--out", str(at_site), "--name", "hospital-a")  # at the site
    out4 = pki_cli("site", "--name", "hospital-a", "--public-key", str(at_site / "node_auth_key.pub"),
                   "--dir", str(pki), "--superlink", "fl.example.org:9092")  # at the coordinator
    assert out2.returncode == 0 and out3.returncode == 0 and out4.returncode == 0, out4.stderr
    for text in (out.stdout, out2.stdout, out3.stdout, out4.stdout):
        assert "PRIVATE KEY" not in text
    ca = x509.load_pem_x509_certificate((pki / "ca" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((pki / "superlink" / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")} <= ips
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    bundle = pki / "sites" / "hospital-a"
    for secret in (pki / "ca" / "ca.key", pki / "superlink" / "server.key", at_site / "node_auth_key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert not (pki / "superlink" / "ca.key").exists()  # the SuperLink's folder holds no CA key
    # the key files load exactly as flower-supernode and `flwr supernode register` load them
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    key = load_ssh_private_key((at_site / "node_auth_key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pub = load_ssh_public_key((bundle / "node_auth_key.pub").read_bytes())
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.crt", "node_auth_key.pub", "site.toml"]  # no private key
    assert (bundle / "ca.crt").read_bytes() == (pki / "ca" / "ca.crt").read_bytes()
    assert "hospital-a," in (pki / "registered_sites.csv").read_text()
    assert main(["pki", "init", "--dir", str(pki)]) == 2
    again = capsys.readouterr().err
    assert "refusing to overwrite" in again and "Traceback" not in again


def _manifest(root, **kw) -> ConsortiumManifest:
    mods = [ModalitySpec(name=m, features=list(pd.read_csv(root / f"{m}.csv.gz", index_col=0, nrows=1).columns))
            for m in ("mRNA", "miRNA", "protein")]
    return ConsortiumManifest(name="brca", classes=["Basal", "Her2", "LumA"], modalities=mods, **kw)


def test_real_site_validates_and_reports_missing_protein(data_root):
    root = data_root / "tcga-brca-mixomics"
    report, _ = validate_site(root, _manifest(root))
    assert report.ok, report.errors
    assert report.summary["patients"] == 220 and report.summary["modalities"]["protein"] == 150
    assert report.summary["patterns"]["mRNA+miRNA"] == 70
    cohort = load_site_cohort(root, _manifest(root), seed=10)
    assert cohort.n == 220 and cohort.modalities == ["mRNA", "miRNA", "protein"]
    assert set(cohort.split) == {"train", "test"}  # mixOmics' own split.csv


def _site(tmp_path, root, edit):
    site = tmp_path / "site"
    site.mkdir()
    labels = pd.read_csv(root / "labels.csv", index_col=0)
    frames = {m: pd.read_csv(root / f"{m}.csv.gz", index_col=0) for m in ("mRNA", "miRNA")}
    edit(labels, frames)
    labels.to_csv(site / "labels.csv")
    for m, f in frames.items():
        f.to_csv(site / f"{m}.csv")
    return site


@pytest.mark.parametrize("case, expected", [
    ("missing", "manifest feature(s) missing"),
    ("order", "not in the manifest's order"),
    ("text", "non-numeric value 'high'"),
    ("inf", "non-finite (inf) value"),
    ("dup", "duplicate sample ids"),
    ("label", "is not a class of the consortium"),
])
def test_bad_site_data_fail_with_a_clear_message(tmp_path, data_root, case, expected):
    root = data_root / "tcga-brca-mixomics"

    def edit(labels, frames):
        m = frames["mRNA"]
        if case == "missing":
            frames["mRNA"] = m.drop(columns=m.columns[3])
        elif case == "order":
            cols = list(m.columns)
            cols[0], cols[1] = cols[1], cols[0]
            frames["mRNA"] = m[cols]
        elif case == "text":
            frames["mRNA"] = m.astype(object)
            frames["mRNA"].iat[2, 4] = "high"
        elif case == "inf":
            m.iat[1, 1] = np.inf
        elif case == "dup":
            frames["mRNA"] = pd.concat([m, m.iloc[:1]])
        elif case == "label":
            labels.iloc[0, 0] = 7

    site = _site(tmp_path, root, edit)
    report, _ = validate_site(site, _manifest(root))
    assert not report.ok and any(expected in e for e in report.errors), report.errors
    assert any("no protein file" in w for w in report.warnings)  # a modality absent entirely is allowed
    proc = _cli("validate-site", str(site), "--manifest", str(_write(tmp_path, _manifest(root))))
    assert proc.returncode == 1 and expected.split("'")[0] in proc.stdout and "Traceback" not in proc.stdout
    with pytest.raises(DataError, match="failed validation"):
        load_site_cohort(site, _manifest(root), seed=1)


def _write(tmp_path, manifest):
    return manifest.save(tmp_path / "manifest.toml")


def test_clean_site_cli_exit_zero(tmp_path, data_root):
    root = data_root / "tcga-brca-mixomics"
    site = _site(tmp_path, root, lambda labels, frames: None)
    proc = _cli("validate-site", str(site), "--manifest", str(_write(tmp_path, _manifest(root))))
    assert proc.returncode == 0, proc.stdout
    assert "patients" in proc.stdout and "220" in proc.stdout
    assert load_cohort_dir(site, log=lambda *a: None).n == 220


def test_absent_feature_is_filled_with_the_scaled_consortium_mean(tmp_path, data_root):
    root = data_root / "tcga-brca-mixomics"
    base = _manifest(root)
    spec = base.modality("mRNA")
    n = len(spec.features)
    mrna = spec.model_copy(update={"impute_means": [5.0] * n, "scale_min": [0.0] * n, "scale_max": [10.0] * n})
    manifest = base.model_copy(update={"missing_feature": "impute",
                                       "modalities": [mrna, base.modality("miRNA"), base.modality("protein")]})
    dropped = spec.features[3]
    def prepared_without(labels, frames):  # prepared data are min-max scaled to [0, 1]
        m = frames["mRNA"]
        frames["mRNA"] = ((m - m.min()) / (m.max() - m.min())).drop(columns=dropped)

    site = _site(tmp_path, root, prepared_without)
    report, _ = validate_site(site, manifest)
    assert report.ok and any("filled with the consortium mean" in w for w in report.warnings)
    cohort = load_site_cohort(site, manifest, seed=1)
    assert np.allclose(cohort.X["mRNA"][:, 3], 0.5)
