"""Federated preparation through the ServerApp/ClientApp protocol: in-process, deployment-style and with Flower."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pandas as pd
import pytest

from magnet_core.cohort.data import DataError
from magnet_core.cohort.manifest import ConsortiumManifest
from magnet_core.cohort.preprocess import STAT_FIELDS, PrepareConfig, load_raw_site_dir, prepare_pooled_decisions
from magnet_core.cohort.validation import load_site_cohort, validate_site
from simulations.engine import InProcessGrid
from simulations.prepare_federated import make_run, run_flower, run_inprocess, site_specs, write_simulated_sites

QUIET = {"log": lambda *_: None}
# the consortium's declared raw value ranges (federated preparation scales with them: sites never send minima or
# maxima); they enclose the cohorts' values: mixomics mRNA -4.0..14.9, miRNA -2.0..19.2, protein -6.0..6.6;
# rjive DNA 0.08..0.99, mRNA -10.2..12.2, miRNA 0..13.3
MIX = {"mRNA": (-5.0, 20.0), "miRNA": (-3.0, 20.0), "protein": (-7.0, 7.0)}
RJIVE = {"DNA": (0.0, 1.0), "mRNA": (-11.0, 13.0), "miRNA": (0.0, 14.0)}


@pytest.fixture(scope="module")
def mixomics_sites(data_root, tmp_path_factory):
    return write_simulated_sites(data_root / "tcga-brca-mixomics", tmp_path_factory.mktemp("mixomics"), 3,
                                 transpose=(2, "mRNA"))


@pytest.fixture(scope="module")
def rjive_lacking(data_root, tmp_path_factory):
    """rjive dealt to 3 sites; site1 lacks the first 5 mRNA features; 2% of cells blank."""
    return write_simulated_sites(data_root / "tcga-brca-rjive", tmp_path_factory.mktemp("rjive"), 3,
                                 lacking=(1, "mRNA", 5), missing_cells=0.02)


def _read(path):
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def test_protocol_sends_only_statistics_and_matches_the_pooled_decisions(mixomics_sites, tmp_path, monkeypatch):
    replies = []
    push = InProcessGrid.push_messages

    def recording_push(self, messages):
        ids = push(self, messages)
        replies.extend(self._replies[i] for i in ids)
        return ids

    monkeypatch.setattr(InProcessGrid, "push_messages", recording_push)
    cfg = PrepareConfig(n_features=50, value_ranges=MIX)
    summary = run_inprocess(make_run(site_specs(mixomics_sites, tmp_path), tmp_path, cfg))
    assert summary["status"] == "ok" and not summary["refused"]
    # every array a site sent is a per-class or per-feature statistic: no patient-level row leaves a site
    stats_replies = [r for r in replies if "stats" in r.content]
    assert len(stats_replies) == 3
    for r in stats_replies:
        for key, arr in r.content["stats"].items():
            m, field = key.split("/")
            d = len(r.content["features"][m])
            assert field in STAT_FIELDS and arr.numpy().shape in {(3,), (3, d)}
            assert field not in ("minimum", "maximum")  # single patients' values: never released
    # the server's decision is the one made from all sites' k-released statistics in one process, and selects the
    # very features the pooled training patients select (scaling uses the declared ranges instead of min / max)
    from magnet_core.federation.privacy import release_site_stats
    from server.prepare_app import decide

    sites = [load_raw_site_dir(d, cfg, **QUIET) for d in mixomics_sites]
    expected, _, _ = decide([release_site_stats(s.stats(3), cfg.min_count)[0] for s in sites], 3, cfg)
    manifest = ConsortiumManifest.load(tmp_path / "manifest.toml")
    assert manifest == expected and manifest.min_count == cfg.min_count
    pooled, _, _ = prepare_pooled_decisions(sites, cfg)
    assert [m.features for m in manifest.modalities] == [m.features for m in pooled.modalities]
    for m in manifest.modalities:
        assert set(m.scale_min) == {MIX[m.name][0]} and set(m.scale_max) == {MIX[m.name][1]}
    for m in manifest.modalities:
        table = pd.read_csv(tmp_path / "decisions" / f"{m.name}.csv", index_col=0)
        assert table.index[table["selected"]].tolist() == m.features
    # each prepared folder passes site validation and loads in manifest order, with the split it was prepared on
    for site, info in zip(sites, summary["sites"]):
        folder = tmp_path / site.name
        report, _ = validate_site(folder, manifest)
        assert report.ok, report.errors
        cohort = load_site_cohort(folder, manifest, seed=10)
        assert cohort.features == {m.name: m.features for m in manifest.modalities}
        assert dict(zip(cohort.sample_ids, cohort.split)) == site.split.to_dict()
        assert info["training_patients"] == len(site.train_ids)
        assert info["prepared"]["mRNA"]["cells_outside_0_1"]["training"] == 0


def test_missing_feature_is_imputed_or_refused_as_the_manifest_says(rjive_lacking, tmp_path):
    lacking = list(pd.read_csv(rjive_lacking[0] / "mRNA.csv.gz", index_col=0, nrows=1).columns[:5])
    # default 10% rule: features absent at a whole site (a third of the patients) are dropped for everyone
    strict = run_inprocess(make_run(site_specs(rjive_lacking, tmp_path / "strict"), tmp_path / "strict",
                                    PrepareConfig(n_features=1000, value_ranges=RJIVE)))
    kept = ConsortiumManifest.load(tmp_path / "strict" / "manifest.toml").modality("mRNA").features
    assert not set(lacking) & set(kept) and strict["modalities"]["mRNA"]["dropped_missing"] == 5
    # a looser rule keeps them; the lacking site fills them with the consortium mean, and says so
    cfg = PrepareConfig(n_features=1000, max_missing_fraction=0.5, missing_feature="impute", value_ranges=RJIVE)
    loose = run_inprocess(make_run(site_specs(rjive_lacking, tmp_path / "loose"), tmp_path / "loose", cfg))
    site1 = next(s for s in loose["sites"] if s["site"] == "site1")
    assert site1["prepared"]["mRNA"]["lacking_features"] == lacking
    manifest = ConsortiumManifest.load(tmp_path / "loose" / "manifest.toml")
    spec = manifest.modality("mRNA")
    prepared = pd.read_csv(tmp_path / "loose" / "site1" / "mRNA.csv.gz", index_col=0)
    j = spec.features.index(lacking[0])
    scaled_mean = (spec.impute_means[j] - spec.scale_min[j]) / (spec.scale_max[j] - spec.scale_min[j])
    np.testing.assert_allclose(prepared[lacking[0]], scaled_mean, rtol=1e-6)
    assert manifest.missing_feature == "impute"
    # "error": that site refuses (reported, nothing written), the others are prepared, the run is incomplete
    cfg = cfg.model_copy(update={"missing_feature": "error"})
    refused = run_inprocess(make_run(site_specs(rjive_lacking, tmp_path / "refuse"), tmp_path / "refuse", cfg))
    assert refused["status"] == "incomplete" and list(refused["refused"]) == ["site1"]
    assert "lacks 5 consortium feature(s)" in refused["refused"]["site1"]
    assert not (tmp_path / "refuse" / "site1").exists() and (tmp_path / "refuse" / "site0" / "mRNA.csv.gz").exists()
    assert json.loads((tmp_path / "refuse" / "prepare_report.json").read_text())["status"] == "incomplete"


def test_one_class_site_is_fine_in_a_consortium_but_not_alone(mixomics_sites, tmp_path):
    labels = pd.read_csv(mixomics_sites[0] / "labels.csv", index_col=0)
    one = tmp_path / "one"
    one.mkdir()
    labels[labels["Class"] == 2].to_csv(one / "labels.csv")
    for p in mixomics_sites[0].iterdir():
        if p.name != "labels.csv":
            (one / p.name).write_bytes(p.read_bytes())
    cfg = PrepareConfig(n_features=20, class_names=["Basal", "Her2", "LumA"], value_ranges=MIX)
    with pytest.raises(DataError, match="single class .* ANOVA F test is undefined"):
        run_inprocess(make_run(site_specs([one], tmp_path / "alone"), tmp_path / "alone", cfg))
    assert json.loads((tmp_path / "alone" / "prepare_report.json").read_text())["status"] == "failed"
    dirs = [one, *mixomics_sites[1:]]
    summary = run_inprocess(make_run(site_specs(dirs, tmp_path / "together"), tmp_path / "together", cfg))
    assert summary["status"] == "ok"
    manifest = ConsortiumManifest.load(tmp_path / "together" / "manifest.toml")
    assert manifest.classes == ["Basal", "Her2", "LumA"]
    assert validate_site(tmp_path / "together" / "one", manifest)[0].ok


def test_a_site_with_bad_data_stops_the_run_naming_site_and_cell(mixomics_sites, tmp_path):
    bad = tmp_path / "badsite"
    bad.mkdir()
    for p in mixomics_sites[1].iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    frame = pd.read_csv(bad / "miRNA.csv.gz", index_col=0).astype(object)
    frame.iloc[3, 7] = "n/a?"
    frame.to_csv(bad / "miRNA.csv.gz")
    dirs = [mixomics_sites[0], bad]
    with pytest.raises(DataError, match=r"badsite: .*miRNA.csv.gz, line 5 \(sample '[^']+'\), column 9 '[^']+': non-numeric value 'n/a\?'"):  # noqa: E501 (one assertion string)
        run_inprocess(make_run(site_specs(dirs, tmp_path / "out"), tmp_path / "out", PrepareConfig(n_features=20, value_ranges=MIX)))  # noqa: E501 (one assertion string)


def test_deployment_style_sites_read_their_folders_from_node_config(mixomics_sites, tmp_path):
    cfg = PrepareConfig(n_features=30, value_ranges=MIX)
    nodes = {i: {"raw-dir": str(d), "prepared-dir": str(tmp_path / "nodes" / f"hospital{i}"),
                 "site-name": f"hospital{i}"} for i, d in enumerate(mixomics_sites)}
    summary = run_inprocess(make_run([], tmp_path / "coordinator", cfg, min_sites=3), node_configs=nodes)
    assert [s["site"] for s in summary["sites"]] == ["hospital0", "hospital1", "hospital2"]
    run_inprocess(make_run(site_specs(mixomics_sites, tmp_path / "sim"), tmp_path / "sim", cfg))
    assert (ConsortiumManifest.load(tmp_path / "coordinator" / "manifest.toml")
            == ConsortiumManifest.load(tmp_path / "sim" / "manifest.toml"))
    assert _read(tmp_path / "nodes" / "hospital2" / "protein.csv.gz") == _read(tmp_path / "sim" / "site2" /
                                                                               "protein.csv.gz")


def test_flower_simulation_with_three_supernodes_equals_in_process(data_root, tmp_path):
    dirs = write_simulated_sites(data_root / "tcga-brca-rjive", tmp_path / "raw", 3, transpose=(2, "mRNA"))
    cfg = PrepareConfig(n_features=100, value_ranges=RJIVE)
    inproc = run_inprocess(make_run(site_specs(dirs, tmp_path / "inproc"), tmp_path / "inproc", cfg))
    flower = run_flower(make_run(site_specs(dirs, tmp_path / "flower"), tmp_path / "flower", cfg))
    print(f"federated preparation through Flower (3 supernodes): {flower['wall_seconds']:.1f} s")
    assert flower["status"] == "ok"
    assert ConsortiumManifest.load(tmp_path / "flower" / "manifest.toml") == ConsortiumManifest.load(
        tmp_path / "inproc" / "manifest.toml")
    files = [p for p in (tmp_path / "inproc").rglob("*") if p.is_file() and p.name != "prepare_report.json"]
    # manifest + 3 decision tables + withheld.json + 3 sites x (labels, split, 3 modalities)
    assert len(files) == 1 + 3 + 1 + 3 * 5
    for p in files:
        assert _read(p) == _read(tmp_path / "flower" / p.relative_to(tmp_path / "inproc")), p
    assert [s["prepared"]["mRNA"] for s in flower["sites"]] == [s["prepared"]["mRNA"] for s in inproc["sites"]]


def _cli(monkeypatch, *argv):
    from simulations.cli import main

    monkeypatch.setattr(sys, "argv", ["magnet-fl"])
    return main(["prepare", *argv])


def test_cli_one_site_from_explicit_files_with_config_and_overrides(data_root, tmp_path, monkeypatch, capsys):
    src = data_root / "tcga-brca-mixomics"
    (tmp_path / "prep.toml").write_text('n_features = 20\nvariance_threshold = { mRNA = 0.03 }\nname = "brca"\n')
    rc = _cli(monkeypatch, "--labels", str(src / "labels.csv"), "--modality", f"mRNA={src / 'mRNA.csv.gz'}",
              "--modality", f"protein={src / 'protein.csv.gz'}", "--split-file", str(src / "split.csv"),
              "--site-name", "hospitalA", "--config", str(tmp_path / "prep.toml"), "--n-features", "30",
              "--classes", "Basal,Her2,LumA", "--out", str(tmp_path / "out"))
    assert rc == 0
    manifest = ConsortiumManifest.load(tmp_path / "out" / "manifest.toml")
    assert manifest.name == "brca" and [len(m.features) for m in manifest.modalities] == [30, 30]
    assert manifest.classes == ["Basal", "Her2", "LumA"]
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["modalities"]["mRNA"]["dropped_variance"] > 0 and report["sites"][0]["training_patients"] == 150
    assert "hospitalA: 220 patients (150 training)" in capsys.readouterr().out
    assert _cli(monkeypatch, "--out", str(tmp_path / "none")) == 2
    assert "no site" in capsys.readouterr().err
    assert _cli(monkeypatch, "--labels", str(src / "labels.csv"), "--modality", f"mRNA={src / 'mRNA.csv.gz'}",
                "--orientation", "features-x-samples", "--out", str(tmp_path / "bad")) == 2
    assert "wrong orientation" in capsys.readouterr().err


def _recording(monkeypatch) -> list:
    """Every message the coordinator receives (the sites' replies), as the in-process grid delivers them."""
    replies = []
    push = InProcessGrid.push_messages

    def recording_push(self, messages):
        ids = push(self, messages)
        replies.extend(self._replies[i] for i in ids)
        return ids

    monkeypatch.setattr(InProcessGrid, "push_messages", recording_push)
    return replies


def _arrays_of(msg) -> list[np.ndarray]:
    if not msg.has_content():
        return []
    return [a.numpy() for rec in msg.content.array_records.values() for a in rec.values()]


def test_a_class_with_one_training_patient_never_leaves_the_site_clear_or_secure(mixomics_sites, tmp_path,
                                                                                 monkeypatch):
    """Site0 keeps one training patient of class 1: neither its values nor its class's statistics appear in any
    message the coordinator receives (clear or secure mode); the site's reply and the decisions file say so."""
    src = mixomics_sites[0]
    split = pd.read_csv(src / "split.csv", index_col=0).iloc[:, 0]
    labels = pd.read_csv(src / "labels.csv", index_col=0)
    train = split.index[split.isin(["train", "val"])]
    ones = [i for i in labels.index[labels.iloc[:, 0] == 1] if i in train]
    keep = labels.index[(labels.iloc[:, 0] != 1)].append(pd.Index(ones[:1]))
    lone = tmp_path / "lone"
    lone.mkdir()
    labels.loc[labels.index.isin(keep)].to_csv(lone / "labels.csv")
    split.loc[split.index.isin(keep)].to_csv(lone / "split.csv")
    patient = {}
    for p in src.glob("*.csv.gz"):
        if p.name in ("labels.csv", "split.csv"):
            continue
        frame = pd.read_csv(p, index_col=0)
        frame.loc[frame.index.isin(keep)].to_csv(lone / p.name)
        if ones[0] in frame.index:
            patient[p.name.split(".")[0]] = frame.loc[ones[0]].to_numpy(dtype=np.float64)
    (lone / "mRNA.tsv.gz").unlink(missing_ok=True)
    assert patient  # the lone patient's raw values, to look for in every message
    dirs = [lone, *mixomics_sites[1:]]
    cfg = PrepareConfig(n_features=20, value_ranges=MIX, class_names=["Basal", "Her2", "LumA"])
    replies = _recording(monkeypatch)
    for mode in ("clear", "secure"):
        replies.clear()
        out = tmp_path / mode
        summary = run_inprocess(make_run(site_specs(dirs, out), out, cfg, secagg=mode == "secure"))
        assert summary["status"] == "ok"
        assert len(replies) >= (6 if mode == "clear" else 18)
        for r in replies:
            for arr in _arrays_of(r):
                flat = arr.astype(np.float64).ravel() if arr.dtype != np.uint64 else arr.view(np.int64) / 2.0**24
                for m, x in patient.items():
                    ok = np.isfinite(x)
                    for row in (arr.reshape(-1, arr.shape[-1]) if arr.ndim == 2 else [flat]):
                        if row.shape[-1] == x.shape[0]:
                            assert not np.allclose(row[ok], x[ok], rtol=1e-6, atol=1e-9), (mode, m)
            if r.has_content() and "stats" in r.content and str(r.content["site"]["name"]) == "lone":
                st = r.content["stats"]
                for m in patient:
                    assert st[f"{m}/n_per_class"].numpy()[1] == 0
                    for f in ("count", "total", "total_sq"):
                        assert not st[f"{m}/{f}"].numpy()[1].any()
        site = next(s for s in summary["sites"] if s["site"] == "lone")
        assert site["classes"][1] is None and "class 1" in site["below_k"]
        assert all(site["withheld"][m]["withheld_classes"] == [1] for m in patient)
        withheld = json.loads((out / "decisions" / "withheld.json").read_text())
        assert withheld["min_count"] == 5 and withheld["sites"]["lone"]["mRNA"]["withheld_classes"] == [1]
    clear = ConsortiumManifest.load(tmp_path / "clear" / "manifest.toml")
    secure = ConsortiumManifest.load(tmp_path / "secure" / "manifest.toml")
    assert [m.features for m in clear.modalities] == [m.features for m in secure.modalities]


def test_secure_preparation_equals_the_clear_one_and_the_coordinator_never_holds_a_site_vector(
        mixomics_sites, tmp_path, monkeypatch):
    from reachable import reachable_arrays

    import client.prepare_app as site_side
    import magnet_core.federation.secagg as secagg

    vectors, servers = [], []
    start = site_side.start_secure_sum

    def recording_start(context, setup, site_id, vector, *auth):
        vectors.append(np.asarray(vector, dtype=np.float64).copy())
        return start(context, setup, site_id, vector, *auth)

    class Recording(secagg.SecAggServer):
        def __init__(self, setup, roster=None):
            super().__init__(setup, roster)
            servers.append(self)

    monkeypatch.setattr(site_side, "start_secure_sum", recording_start)
    monkeypatch.setattr(secagg, "SecAggServer", Recording)
    cfg = PrepareConfig(n_features=40, value_ranges=MIX, max_missing_fraction=0.5)
    clear = run_inprocess(make_run(site_specs(mixomics_sites, tmp_path / "c"), tmp_path / "c", cfg))
    secure = run_inprocess(make_run(site_specs(mixomics_sites, tmp_path / "s"), tmp_path / "s", cfg, secagg=True))
    assert secure["secure_aggregation"]["sites"] == ["site0", "site1", "site2"]
    assert secure["secure_aggregation"]["threshold"] == 2 and clear["secure_aggregation"] is None
    a = ConsortiumManifest.load(tmp_path / "c" / "manifest.toml")
    b = ConsortiumManifest.load(tmp_path / "s" / "manifest.toml")
    assert [m.features for m in a.modalities] == [m.features for m in b.modalities]
    for ma, mb in zip(a.modalities, b.modalities):
        np.testing.assert_allclose(ma.impute_means, mb.impute_means, rtol=1e-7, atol=1e-7)
        assert ma.scale_min == mb.scale_min and ma.scale_max == mb.scale_max
    for m in a.modalities:  # the audit tables (missing fraction, mean, variance, F) agree to the fixed point
        ta = pd.read_csv(tmp_path / "c" / "decisions" / f"{m.name}.csv", index_col=0)
        tb = pd.read_csv(tmp_path / "s" / "decisions" / f"{m.name}.csv", index_col=0)
        assert (ta["selected"] == tb["selected"]).all()
        for col in ("missing_fraction", "mean", "variance", "f"):
            np.testing.assert_allclose(ta[col], tb[col], rtol=1e-6, atol=1e-8, err_msg=col)
    # the coordinator's secure-sum object holds the masked running sum and the total, never one site's vector
    assert len(servers) == 1 and len(vectors) == 3
    server = servers[0]
    np.testing.assert_allclose(server.total, np.sum(vectors, axis=0), atol=3 * 2.0**-25)
    for arr in reachable_arrays(server):
        for v in vectors:
            if arr.shape == v.shape:
                decoded = arr.view(np.int64) / 2.0**24 if arr.dtype == np.uint64 else arr
                assert not np.allclose(decoded, v, atol=1e-3)
    # a site that drops after masking is still in the sum (same decisions); one that drops before masking is left
    # out of the consortium statistics (and the report says so)
    from flwr.app import Error, Message

    push = InProcessGrid.push_messages
    lost: set[tuple[str, int]] = set()

    def dropping_push(self, messages):
        keep, ids = [], []
        for m in messages:
            if (m.metadata.message_type, m.metadata.dst_node_id) in lost:
                m.metadata.__dict__["_message_id"] = f"lost-{m.metadata.message_type}-{m.metadata.dst_node_id}"
                self._replies[m.metadata.message_id] = Message(Error(code=0, reason="node went away (test)"),
                                                               reply_to=m)
                ids.append(m.metadata.message_id)
            else:
                keep.append(m)
        return ids + list(push(self, keep))

    monkeypatch.setattr(InProcessGrid, "push_messages", dropping_push)
    nodes = [1, 2, 3]  # the in-process grid's node ids
    lost = {("query.secagg_unmask", nodes[0])}
    after = run_inprocess(make_run(site_specs(mixomics_sites, tmp_path / "a"), tmp_path / "a", cfg, secagg=True))
    sa = after["secure_aggregation"]
    assert sa["sites"] == ["site0", "site1", "site2"] and len(sa["dropped_after_masking"]) == 1
    assert ConsortiumManifest.load(tmp_path / "a" / "manifest.toml") == b
    lost = {("query.secagg_mask", nodes[0])}
    before = run_inprocess(make_run(site_specs(mixomics_sites, tmp_path / "b"), tmp_path / "b", cfg, secagg=True))
    sb = before["secure_aggregation"]
    assert len(sb["sites"]) == 2 and len(sb["dropped_before_masking"]) == 1 and sb["failed"]
    lost = {("query.secagg_mask", nodes[0]), ("query.secagg_mask", nodes[1])}
    with pytest.raises(DataError, match="secure sum of the sites' statistics failed: .*only 1 of 3 sites"):
        run_inprocess(make_run(site_specs(mixomics_sites, tmp_path / "f"), tmp_path / "f", cfg, secagg=True))
    lost = set()
    # a site that requires secure aggregation refuses to send its statistics in the clear
    strict = {i: {"raw-dir": str(d), "prepared-dir": str(tmp_path / "n" / f"h{i}"), "site-name": f"h{i}",
                  "prepare-require-secagg": True} for i, d in enumerate(mixomics_sites)}
    with pytest.raises(DataError, match="h0: this site sends its statistics only through secure aggregation"):
        run_inprocess(make_run([], tmp_path / "n", cfg, min_sites=3), node_configs=strict)
    assert run_inprocess(make_run([], tmp_path / "n", cfg, min_sites=3, secagg=True),
                         node_configs=strict)["status"] == "ok"


def test_cli_range_and_secagg_flags(tmp_path, monkeypatch, capsys):
    import argparse

    from simulations.prepare_cli import _ranges, build_config

    assert _ranges("mRNA=-5:20, DNA=0:1") == {"mRNA": (-5.0, 20.0), "DNA": (0.0, 1.0)}
    with pytest.raises(argparse.ArgumentTypeError, match="MODALITY=LOW:HIGH"):
        _ranges("mRNA=5")
    assert _cli(monkeypatch, "--site", str(tmp_path), "--secagg", "--out", str(tmp_path / "o")) == 2
    assert "add --federated" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    from simulations.prepare_cli import add_arguments

    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--federated", "--secagg", "--min-count", "7", "--value-range",
                              "mRNA=-5:20"])
    cfg = build_config(args)
    assert cfg.min_count == 7 and cfg.value_ranges == {"mRNA": (-5.0, 20.0)}


# ------------------------------------------------------------------ magnet-fl prepare --secagg-roster --site-key


def _keyed_sites(root):
    """Three tiny raw sites (named h0, h1, h2 after their folders), each one's key as `magnet-fl pki site-key`
    makes it, and the roster as registered_sites.csv."""
    from test_malicious_coordinator import raw_site

    from server.pki import make_site_key

    dirs, keys, rows = [], {}, ["site,public_key"]
    for i, name in enumerate(["h0", "h1", "h2"]):
        dirs.append(raw_site(root / "raw" / name, per=40 + 4 * i))
        keys[name], pub = make_site_key(root / "keys" / name, comment=name)
        rows.append(f"{name},{pub.read_text().strip()}")
    roster = root / "registered_sites.csv"
    roster.write_text("\n".join(rows) + "\n")
    return dirs, keys, roster


def _prepare_args(dirs, out, *extra):
    import argparse

    from simulations.prepare_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*(a for d in dirs for a in ("--site", str(d))), "--out", str(out), "--federated",
                              "--secagg", "--n-features", "5", "--value-range", "mRNA=0:12", *map(str, extra)])


def test_cli_secagg_roster_a_bad_roster_or_key_is_one_line_naming_the_file_and_what_is_wrong(tmp_path, monkeypatch,
                                                                                            capsys):
    dirs, keys, roster = _keyed_sites(tmp_path)
    sites = [a for d in dirs for a in ("--site", str(d))]
    common = [*sites, "--federated", "--secagg", "--value-range", "mRNA=0:12", "--out", str(tmp_path / "out")]
    site_keys = [a for n, k in keys.items() for a in ("--site-key", f"{n}={k}")]
    header = tmp_path / "header.csv"
    header.write_text("name,key\n" + "\n".join(roster.read_text().splitlines()[1:]) + "\n")
    one = tmp_path / "one.csv"
    one.write_text("\n".join(roster.read_text().splitlines()[:2]) + "\n")
    garbled = tmp_path / "garbled.csv"
    garbled.write_text(roster.read_text().replace("ecdsa-sha2-nistp384 AAAA", "ecdsa-sha2-nistp384 ####", 1))
    twice = tmp_path / "twice.csv"
    twice.write_text(roster.read_text() + roster.read_text().splitlines()[1] + "\n")
    no_h2 = tmp_path / "no_h2.csv"
    no_h2.write_text("\n".join(roster.read_text().splitlines()[:3]) + "\n")
    cases = [(tmp_path / "absent.csv", "no such roster file"),
             (header, "the first row must be 'site,public_key'"),
             (one, "a roster needs at least 2 sites, got 1"),
             (garbled, "roster site 'h0': not an OpenSSH or PEM public key"),
             (twice, "site 'h0' is listed twice"),
             (no_h2, "site 'h2' is not listed")]
    for path, what in cases:
        assert _cli(monkeypatch, *common, "--secagg-roster", str(path), *site_keys) == 2, path
        err = capsys.readouterr().err
        assert err.startswith(f"error: --secagg-roster {path.resolve()}: ") and what in err, err
        assert err.count("\n") == 1 and "Traceback" not in err and "pydantic" not in err, err
    # the sites' keys: one missing, one that is not the roster's key for that site, one for no site
    assert _cli(monkeypatch, *common, "--secagg-roster", str(roster), *site_keys[:4]) == 2
    assert "site 'h2' has no identity key" in capsys.readouterr().err
    swapped = ["--site-key", f"h0={keys['h1']}", "--site-key", f"h1={keys['h0']}", *site_keys[4:]]
    assert _cli(monkeypatch, *common, "--secagg-roster", str(roster), *swapped) == 2
    assert f"--site-key h0={keys['h1'].resolve()}: the roster's key for 'h0' is not this site's identity key" in \
        capsys.readouterr().err
    assert _cli(monkeypatch, *common, "--secagg-roster", str(roster), *site_keys, "--site-key",
                f"h9={keys['h0']}") == 2
    assert "--site-key h9: no site of this preparation is named 'h9'" in capsys.readouterr().err
    # the roster authenticates a federated secure sum only
    plain = [c for c in common if c != "--secagg"]
    assert _cli(monkeypatch, *plain, "--secagg-roster", str(roster), *site_keys) == 2
    assert "add --federated --secagg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_secagg_roster_authenticates_the_sum_each_simulated_site_signing_with_its_own_key(tmp_path):
    """What `magnet-fl prepare --federated --secagg --secagg-roster --site-key` runs, with messages delivered in this
    process: every site signs its keys and the coordinator checks them against the roster; without the sites' keys
    (the run config's roster alone) no site can sign and the sum fails."""
    from flwr.app import Context, RecordDict

    from server.prepare_app import prepare_and_record
    from simulations.prepare_cli import build_config, build_sites, secagg_sites
    from simulations.prepare_federated import simulated_sites_app

    dirs, keys, roster = _keyed_sites(tmp_path)
    args = _prepare_args(dirs, tmp_path / "out", "--secagg-roster", roster,
                         *(a for n, k in keys.items() for a in ("--site-key", f"{n}={k}")))
    specs = build_sites(args)
    path, nodes = secagg_sites(args, specs)
    assert path == str(roster.resolve()) and [n["secagg-identity-key"] for n in nodes.values()] == \
        [str(keys[s.name].resolve()) for s in specs]
    run = make_run(specs, args.out, build_config(args), secagg=True, secagg_roster=path)

    def prepare(app):
        return prepare_and_record(InProcessGrid(app, 3), Context(run_id=1, node_id=0, node_config={},
                                                                 state=RecordDict(), run_config={}), run)

    summary = prepare(simulated_sites_app(nodes))
    sa = summary["secure_aggregation"]
    assert summary["status"] == "ok" and sa["authenticated"] and sorted(sa["sites"]) == ["h0", "h1", "h2"], sa
    assert ConsortiumManifest.load(args.out / "manifest.toml").modalities[0].features
    with pytest.raises(DataError, match="secure sum of the sites' statistics failed"):
        prepare(simulated_sites_app({}))
