"""The HTML run report: self-contained, every section present, real records of a run with a rejected update and a
failed site, the site's view, and small counts withheld."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from poisoned_site import poison

from magnet_core.artefacts.report import (
    RunRecords,
    render_report,
    summarize_counts,
    suppress_partition,
    write_report,
)
from magnet_core.consortium.methods import detail

SECTIONS = ("configuration", "rounds", "sites", "privacy", "model")
SITE_SECTIONS = ("site-overview", "site-messages", "site-coordinator")
EXTERNAL = re.compile(r"""(?:src|href|srcset|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//"""
                      r"""|@import|url\(\s*["']?\s*(?:https?:)?//|<script[^>]*\ssrc\s*=|<link[^>]*stylesheet""",
                      re.IGNORECASE)


def assert_self_contained(html: str) -> None:
    """No external resource of any kind: no remote src/href, no @import, no CSS url(), no script or stylesheet
    file; every image is an embedded PNG."""
    assert not EXTERNAL.findall(html), EXTERNAL.findall(html)[:5]
    assert "http://" not in html and "https://" not in html
    for src in re.findall(r"<img[^>]*\ssrc=\"([^\"]{0,40})", html):
        assert src.startswith("data:image/png;base64,"), src


@pytest.fixture(scope="module")
def attacked_run(tmp_path_factory) -> Path:
    """A real 2-round in-process run: site1 sends a x1e4 update (rejected), node 3's data are missing (failed);
    every site keeps its own log (node config ``site-log-dir``)."""
    from server.config import FederatedConfig
    from simulations.engine import run_inprocess

    out = tmp_path_factory.mktemp("attacked") / "run"
    cfg = FederatedConfig(num_server_rounds=2, local_epochs=1, data_path="generated:120", scenario="iid-3",
                          min_sites=1, seed=3, out_dir=str(out))
    nodes = {0: {}, 1: {},
             2: {"data-dir": str(out / "no-such-site"), "manifest": str(out / "no-such-manifest.toml")}}
    for pid, node in nodes.items():
        node["site-log-dir"] = str(out / "sites" / f"site{pid}")
    with pytest.MonkeyPatch.context() as mp:
        poison(mp, {"site1": "scale"})  # the test side corrupts site1's update (no hook in the site)
        _, history = run_inprocess(cfg, 3, node_configs=nodes)
    assert [r["accepted"] for r in history] == [["site0"], ["site0"]]
    return out


def test_report_of_a_run_with_a_rejected_update_and_a_failed_site(attacked_run):
    path = write_report(attacked_run)
    assert path == attacked_run / "report.html"
    html = path.read_text()
    assert_self_contained(html)
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    assert "GENERATED cohort" in html  # the generated-data notice
    history = json.loads((attacked_run / "history.json").read_text())
    reason = history[0]["rejected"]["site1"]
    assert reason.replace("'", "&#39;") in html  # the rejection reason, as recorded
    assert "site1 · node 2" in html and "site2 · node 3" in html  # site and node id of each (names enrolled)
    assert "manifest not found" in html  # the failed site's error
    assert history[0]["config_fingerprint"] in html
    assert html.count("data:image/png;base64,") >= 2  # rounds + site availability figures
    assert "minimum count k" in html and "secure aggregation" in html
    assert "model.pt" in html and "No model package" in html
    # per-site data of the simulated sites: 120 patients over 3 sites, test sets of ~8 (< k = 5 they are not)
    assert "holding the modality" in html and "withheld" in html


def test_site_view_shows_what_left_the_site_and_what_the_coordinator_did_with_it(attacked_run):
    html = write_report(attacked_run, site="site1").read_text()
    assert_self_contained(html)
    for section in SITE_SECTIONS:
        assert f'<section id="{section}">' in html
    log = [json.loads(line) for line in (attacked_run / "sites" / "site1" / "site_log.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in log} == {"train", "evaluate"} and len(log) == 4
    first_array = next(i for i in log[0]["sent"] if i["kind"] == "array")
    assert first_array["name"] in html and "×".join(map(str, first_array["shape"])) in html
    reason = json.loads((attacked_run / "history.json").read_text())[0]["rejected"]["site1"]
    assert "rejected" in html and reason.replace("'", "&#39;") in html  # the coordinator's record of this site
    # from the site's own log directory, without the coordinator's records
    site_dir = attacked_run / "sites" / "site0"
    html0 = write_report(site_dir).read_text()
    assert (site_dir / "report.html").exists() and "Site report: site0" in html0
    assert "not available on the site" in html0


def _signing_pair(tmp_path: Path) -> tuple[Path, Path]:
    """An Ed25519 signing key and a self-issued certificate (the report shows a package; it does not verify it)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "report test signer")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, None))
    (tmp_path / "sign.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (tmp_path / "sign.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return tmp_path / "sign.key", tmp_path / "sign.crt"


def test_model_package_and_signature_are_shown_when_written(attacked_run, tmp_path):
    import hashlib

    import torch

    from magnet_core.artefacts.model_package import manifest_from_cohort, write_package
    from magnet_core.consortium.simulated import load_consortium
    from magnet_core.model.config import get_preset

    run = tmp_path / "run"
    shutil.copytree(attacked_run, run, ignore=shutil.ignore_patterns("sites", "*.html"))
    params = {k: v.numpy() for k, v in torch.load(run / "model.pt").items()}
    cohort, _ = load_consortium("generated:120", "iid-3", 3)
    preset = get_preset("ov")
    key, cert = _signing_pair(tmp_path)
    path = write_package(run / "model.magnet", params, manifest=manifest_from_cohort(cohort), preset="ov",
                         model_cfg=preset.model, graph_cfg=preset.graph, run_config={"seed": 3}, signing_key=key,
                         signing_cert=cert, round=2, metrics={"mcc": 0.5})
    html = write_report(run).read_text()
    assert_self_contained(html)
    assert hashlib.sha256(path.read_bytes()).hexdigest() in html
    assert "model.magnet" in html and "No model package" not in html
    assert "Ed25519" in html and "CN=report test signer" in html and "not by this report" in html


def test_small_counts_are_withheld_including_by_subtraction():
    assert suppress_partition({"a": 3, "b": 50, "c": 20}, 5) == {"a": None, "b": 50, "c": None}
    assert suppress_partition({"a": 0, "b": 50}, 5) == {"a": 0, "b": 50}
    assert suppress_partition({"a": 2, "b": 4, "c": 30}, 5) == {"a": None, "b": None, "c": 30}
    s = summarize_counts({"patients": 40, "modalities": {"mRNA": 38, "miRNA": 40, "DNA": 3},
                          "classes": {"class 0": 37, "class 1": 3}}, 5)
    assert s["modalities"] == {"mRNA": None, "miRNA": 40, "DNA": None}
    assert s["classes"] == {"class 0": None, "class 1": None}
    assert summarize_counts({"patients": 4, "classes": {"x": 4}}, 5)["withheld_site"]
    # rendered: the hidden counts do not appear, the page says they are withheld
    records = RunRecords(run_dir=Path("run"), kind="federated", generated=False, config={}, histories={
        "run": [{"round": 1, "accepted": ["a"], "rejected": {}, "failed": {},
                 "global": {"mcc": 0.5, "auroc": 0.8, "auroc_low": 0.79, "auroc_high": 0.81},
                 "site_data": {"a": {"patients": 40, "classes": {"class 0": 37, "class 1": 3}}},
                 "sites": {"a": {"num": 4, "mcc": 0.25}}}]})
    from magnet_core.artefacts.report import _reported_site_data

    records.site_data = {k: summarize_counts(v, 5) for k, v in _reported_site_data(records.histories).items()}
    html = render_report(records)
    assert_self_contained(html)
    assert ">37 (" not in html and ">3 (" not in html and "withheld" in html
    assert "[0.790, 0.810]" in html  # the binned AUROC's bounds
    assert "0.250" not in html  # a site with 4 < k test patients shows no metric


def test_simulate_ends_with_the_report_and_the_report_command(tmp_path, capsys):
    from simulations.cli import main

    out = tmp_path / "demo"
    assert main(["simulate", "--scenario", "demo-3", "--rounds", "1", "--local-epochs", "1", "--seeds", "1",
                 "--engine", "inprocess", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in " ".join(printed.split())
    html = (out / "report.html").read_text()
    assert_self_contained(html)
    for section in (*SECTIONS, "comparison"):
        assert f'<section id="{section}">' in html
    for method in (detail("federated"), detail("centralized"), detail("local_only")):
        assert method in html
    assert "demo-3" in html and "GENERATED cohort" in html and ".partial-" not in html  # final folder named
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()
    assert main(["report", str(out), "--site", "site9"]) == 2
    assert "site9" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_in_headless_chromium(attacked_run, tmp_path):
    from simulations.browser_check import REPORT_SECTIONS, check_page

    res = check_page(write_report(attacked_run), tmp_path, shutil.which("chromium"), settle=0.3)
    assert res.problems(REPORT_SECTIONS) == []
    assert res.images >= 2 and all(Path(p).stat().st_size > 10_000 for p in res.screenshots)
