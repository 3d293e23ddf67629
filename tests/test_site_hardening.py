"""Local hardening at a site: the SuperNode's node config cannot be injected through a path, patient-level outputs are
0600 in 0700 folders, `predict` does not overwrite and can require a given or the newest model package."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import tomli_w
from test_package import _package, make_pki, small_manifest

from server.pki import SITE_PUB, init_ca, issue_server_cert, make_site, make_site_key


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture()
def deploy(capsys):
    from simulations.cli import main

    def call(*args):
        capsys.readouterr()
        code = main(["deploy", *map(str, args)])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return call


def _site(tmp_path):
    """A site folder as the guide describes (its key pair, the coordinator's bundle files) that approved one app."""
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_server_cert(pki, ["localhost"])
    at_site = tmp_path / "at hospital a"
    make_site_key(at_site, comment="hospital-a")
    for f in make_site(pki, "hospital-a", at_site / SITE_PUB, "127.0.0.1:9092").iterdir():
        shutil.copy(f, at_site / f.name)
    (at_site / "approved-apps.toml").write_text(tomli_w.dumps({"app": [{"sha256": "ab" * 32}]}))
    return at_site


def test_a_quote_in_the_data_path_cannot_set_another_node_config_key(tmp_path, deploy):
    """`deploy supernode --print` with a data folder named ``x' dp-min-noise-multiplier=0 y='z``: the node config
    Flower reads (its own parser, as flower-supernode applies it) holds that path as data-dir and nothing else."""
    from flwr.common.config import parse_config_args

    at_site = _site(tmp_path)
    data = tmp_path / "site x' dp-min-noise-multiplier=0 y='z"
    data.mkdir()
    manifest = tmp_path / "manifest.toml"
    out = deploy("supernode", "--bundle", at_site, "--data", data, "--manifest", manifest, "--skip-validation",
                 "--log-dir", tmp_path / "log' worker-socket='/tmp/elsewhere", "--print")
    assert out.returncode == 0, out.stderr
    line = shlex.split(out.stdout)
    node_config = parse_config_args([line[line.index("--node-config") + 1]])
    assert node_config == {"data-dir": str(data.resolve()), "manifest": str(manifest.resolve()),
                           "site-name": "hospital-a",
                           "site-log-dir": str((tmp_path / "log' worker-socket='/tmp/elsewhere").resolve())}
    assert "dp-min-noise-multiplier" not in node_config and "worker-socket" not in node_config


def _small_site(tmp_path):
    """A prepared site folder (labels.csv, split.csv, two modalities) for small_manifest()."""
    rng = np.random.default_rng(0)
    manifest = small_manifest()
    ids = [f"P{i:03d}" for i in range(40)]
    site = tmp_path / "site"
    site.mkdir()
    pd.DataFrame({"Class": rng.integers(0, 2, 40)}, index=pd.Index(ids, name="sampleID")).to_csv(site / "labels.csv")
    split = np.where(np.arange(40) < 30, "train", "test")
    pd.DataFrame({"split": split}, index=pd.Index(ids, name="sampleID")).to_csv(site / "split.csv")
    for spec in manifest.modalities:
        pd.DataFrame(rng.random((40, len(spec.features))), index=pd.Index(ids, name="sampleID"),
                     columns=spec.features).to_csv(site / f"{spec.name}.csv")
    return site


def _predict(*args):
    from simulations.cli import main

    return main(["predict", *map(str, args)])


def test_predict_writes_0600_in_a_0700_folder_and_never_overwrites_unasked(tmp_path, capsys):
    site, pki_ = _small_site(tmp_path), make_pki(tmp_path)
    path, _ = _package(tmp_path, pki_)
    common = ("--package", path, "--ca", pki_[0], "--reference", site, "--patients", site, "--split", "test")
    out = tmp_path / "results" / "new" / "pred.csv"
    assert _predict(*common, "--out", out) == 0, capsys.readouterr().err
    assert _mode(out) == 0o600 and _mode(out.parent) == 0o700 and _mode(out.parent.parent) == 0o700
    first = out.read_bytes()
    out.write_text("the previous predictions, kept\n")
    capsys.readouterr()
    assert _predict(*common, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{out} exists; refusing to overwrite it (pass --overwrite to replace it)" in err
    assert out.read_text() == "the previous predictions, kept\n"
    assert _predict(*common, "--out", out, "--overwrite") == 0
    assert out.read_bytes() == first and _mode(out) == 0o600
    # an existing folder open to others is left as it is, and said
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    capsys.readouterr()
    assert _predict(*common, "--out", shared / "p.csv") == 0
    assert _mode(shared / "p.csv") == 0o600 and "is open to others" in capsys.readouterr().err


def test_predict_refuses_an_old_package_of_another_run_or_round(tmp_path, capsys):
    """The coordinator's round-3 package of run r2 was used; then an older one (round 1 of run r1, all-zero
    weights, signed with the same consortium key) is offered: refused by --require-latest, --require-run and
    --require-round, each naming the package's run, round and date."""
    site, pki_ = _small_site(tmp_path), make_pki(tmp_path)
    old, _ = _zero_package(tmp_path, pki_)
    time.sleep(0.01)  # written after it
    new, _ = _package(tmp_path, pki_, name="new.magnet", run="r2")
    record = tmp_path / "used-packages.json"
    common = ("--ca", pki_[0], "--reference", site, "--patients", site, "--split", "test")
    assert _predict("--package", new, *common, "--out", tmp_path / "a.csv", "--require-latest", record) == 0
    assert _mode(record) == 0o600 and [e["run"] for e in json.loads(record.read_text())] == ["r2"]
    capsys.readouterr()
    assert _predict("--package", old, *common, "--out", tmp_path / "b.csv", "--require-latest", record) == 2
    err = capsys.readouterr().err
    assert "older than the newest this site has used: it is from run r1, round 1" in err and "run r2, round 3" in err
    assert _predict("--package", old, *common, "--out", tmp_path / "c.csv", "--require-run", "r2") == 2
    assert "this site requires run r2" in capsys.readouterr().err
    assert _predict("--package", old, *common, "--out", tmp_path / "d.csv", "--require-round", "3") == 2
    assert "this site requires round 3" in capsys.readouterr().err
    assert not any((tmp_path / f"{x}.csv").exists() for x in "bcd")
    assert _predict("--package", new, *common, "--out", tmp_path / "e.csv", "--require-run", "r2", "--require-round",
                    "3", "--require-latest", record) == 0
    assert len(json.loads(record.read_text())) == 1  # the same package is recorded once


def _zero_package(tmp_path, pki_):
    """Round 1 of another run, all-zero weights: a real, signed, but stale package."""
    from test_package import MODEL

    from magnet_core.artefacts.model_package import write_package
    from magnet_core.model.config import GraphConfig

    _, params = _package(tmp_path, pki_, name="shape.magnet")
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    path = write_package(tmp_path / "old.magnet", zeros, manifest=small_manifest(), preset="ov", model_cfg=MODEL,
                         graph_cfg=GraphConfig(sparsity=0.8), run_config={"seed": 1}, signing_key=pki_[1],
                         signing_cert=pki_[2], round=1, run="r1")
    return path, zeros


def test_prepared_patient_files_are_0600_in_0700_folders(data_root, tmp_path):
    """Federated preparation (the sites' ClientApp handlers, in-process): every prepared site folder is 0700 and
    every file in it 0600, whatever the umask."""
    from magnet_core.cohort.preprocess import PrepareConfig
    from simulations.prepare_federated import make_run, run_inprocess, site_specs, write_simulated_sites

    raw = write_simulated_sites(data_root / "tcga-brca-mixomics", tmp_path / "raw", 2)
    old = os.umask(0o022)
    try:
        cfg = PrepareConfig(n_features=20, value_ranges={"mRNA": (-5.0, 20.0), "miRNA": (-3.0, 20.0),
                                                         "protein": (-7.0, 7.0)})
        summary = run_inprocess(make_run(site_specs(raw, tmp_path / "prepared"), tmp_path / "prepared", cfg))
    finally:
        os.umask(old)
    assert summary["status"] == "ok", summary
    folders = [p for p in (tmp_path / "prepared").rglob("*") if p.is_dir() and (p / "labels.csv").exists()]
    assert len(folders) == 2
    for folder in folders:
        files = [p for p in folder.iterdir() if p.is_file()]
        assert {p.name for p in files} >= {"labels.csv", "split.csv"}
        assert _mode(folder) == 0o700 and all(_mode(p) == 0o600 for p in files), \
            (oct(_mode(folder)), {p.name: oct(_mode(p)) for p in files})


@pytest.mark.parametrize("bad", ["data dir", "Data", "x=1"])
def test_node_config_keys_are_checked(tmp_path, bad):
    from client.deploy_site import supernode_command

    at_site = _site(tmp_path)
    with pytest.raises(ValueError, match=f"node-config key {bad!r}"):
        supernode_command(at_site, tmp_path, tmp_path / "m.toml", 9094, {bad: "v"})
    with pytest.raises(ValueError, match="node-config key 'data-dir' is set by deploy supernode itself"):
        supernode_command(at_site, tmp_path, tmp_path / "m.toml", 9094, {"data-dir": "/elsewhere"})
