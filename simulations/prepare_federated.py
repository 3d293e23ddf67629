"""Runs the federated preparation's ServerApp and ClientApp, in-process or through Flower's simulation engine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from magnet_core.cohort.data import DataError
from magnet_core.cohort.preprocess import PrepareConfig, SiteSpec


def site_specs(site_dirs: Sequence[str | Path], out_dir: str | Path) -> list[SiteSpec]:
    """One site per raw folder, named after it; its prepared cohort goes to ``out_dir/<name>``."""
    specs, seen = [], set()
    for d in site_dirs:
        name = Path(d).resolve().name
        if name in seen or name in ("decisions",):
            raise DataError(f"two site folders are named {name!r} (or a reserved name); give them distinct names")
        seen.add(name)
        specs.append(SiteSpec(name=name, raw_dir=str(d), out_dir=str(Path(out_dir) / name)))
    return specs


def make_run(sites: Sequence[SiteSpec], out_dir: str | Path, cfg: PrepareConfig | None = None, **kw):
    from server.prepare_app import PrepareRun

    return PrepareRun(prepare=cfg or PrepareConfig(), sites=list(sites), out_dir=str(out_dir), **kw)


def run_inprocess(run, node_configs: dict[int, dict] | None = None) -> dict:
    """The same ServerApp body and ClientApp handlers, messages delivered by direct calls (no Ray).
    ``node_configs``: extra node_config per partition id (e.g. deployment-style ``raw-dir`` / ``prepared-dir``)."""
    from flwr.app import Context, RecordDict

    from client.prepare_app import app as client_app
    from server.prepare_app import prepare_and_record

    from .engine import InProcessGrid

    num_nodes = max(run.expected_sites(), len(node_configs or {}))
    grid = InProcessGrid(client_app, num_nodes, node_configs=node_configs)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    t0 = time.perf_counter()
    summary = prepare_and_record(grid, ctx, run)
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def simulated_sites_app(node_configs: dict[int, dict]):
    """The preparation ClientApp whose simulated site of partition i also holds ``node_configs[i]`` in its node
    config (e.g. its identity key and roster for an authenticated secure sum), as a deployed site's worker holds
    them from its own command line: Flower's simulation engine gives a node only its partition id."""
    from client.prepare_app import HANDLERS
    from client.site_path import client_app
    from magnet_core.protocol.keys import NODE_PARTITION_ID

    own = {int(k): dict(v) for k, v in node_configs.items()}

    def with_own_config(msg, context, call_next):
        context.node_config = {**context.node_config, **own.get(int(context.node_config[NODE_PARTITION_ID]), {})}
        return call_next(msg, context)

    return client_app(HANDLERS, mods={kind: [with_own_config] for kind in HANDLERS})


def run_flower(run, verbose: bool = False, cpus_per_site: float = 1.0, node_configs: dict[int, dict] | None = None
               ) -> dict:
    """Through Flower's simulation engine: one SuperNode per site (Ray actors), the ServerApp in this process.
    Results are read back from the run's output directory. ``node_configs``: extra node config per partition id
    (``simulated_sites_app``)."""
    from client.prepare_app import app as client_app
    from server.prepare_app import RUN_KEY
    from server.prepare_app import app as server_app

    from .engine import run_flower_app

    report = Path(run.out_dir) / "prepare_report.json"
    report.unlink(missing_ok=True)
    if node_configs:
        client_app = simulated_sites_app(node_configs)
    t0 = time.perf_counter()
    run_flower_app(server_app, client_app, {RUN_KEY: run.model_dump_json()}, run.expected_sites(), verbose,
                   cpus_per_site=cpus_per_site)
    wall = time.perf_counter() - t0
    if not report.exists():
        raise RuntimeError(f"the Flower run ended without writing {report}; see the log above")
    summary = json.loads(report.read_text())
    if summary.get("status") == "failed":
        raise DataError(summary["error"])
    summary["wall_seconds"] = wall
    return summary


# ----------------------------------------------------------------------------- simulated sites and checks


def write_simulated_sites(cohort_dir: str | Path, out: str | Path, num_sites: int = 3, seed: int = 0,
                          transpose: tuple[int, str] | None = None, lacking: tuple[int, str, int] | None = None,
                          missing_cells: float = 0.0) -> list[Path]:
    """Deal a cohort-layout folder's samples to ``num_sites`` raw site folders (labels, matrices, split.csv if
    any). Optional twists: site ``transpose[0]`` writes modality ``transpose[1]`` as features x samples TSV;
    site ``lacking[0]`` lacks the first ``lacking[2]`` features of ``lacking[1]``; a fraction ``missing_cells`` of
    every matrix's cells is blanked (seeded)."""
    import numpy as np
    import pandas as pd

    from magnet_core.cohort.data import _modality_files

    cohort_dir, out = Path(cohort_dir), Path(out)
    labels = pd.read_csv(cohort_dir / "labels.csv", index_col=0)
    split = pd.read_csv(cohort_dir / "split.csv", index_col=0) if (cohort_dir / "split.csv").exists() else None
    mods = {m: pd.read_csv(p, index_col=0) for m, p in _modality_files(cohort_dir).items()}
    rng = np.random.default_rng(seed)
    ids = sorted(set(labels.index).union(*[set(df.index) for df in mods.values()]))
    dirs = []
    for s, part in enumerate(np.array_split(rng.permutation(ids), num_sites)):
        d = out / f"site{s}"
        d.mkdir(parents=True, exist_ok=True)
        labels.loc[labels.index.intersection(part)].sort_index().to_csv(d / "labels.csv")
        if split is not None:
            split.loc[split.index.intersection(part)].sort_index().to_csv(d / "split.csv")
        for m, df in mods.items():
            sub = df.loc[df.index.intersection(part)].sort_index()
            if lacking is not None and lacking[:2] == (s, m):
                sub = sub.drop(columns=sub.columns[: lacking[2]])
            if missing_cells > 0:
                sub = sub.mask(rng.random(sub.shape) < missing_cells)
            if transpose == (s, m):
                sub.T.to_csv(d / f"{m}.tsv.gz", sep="\t")
            else:
                sub.to_csv(d / f"{m}.csv.gz")
        dirs.append(d)
    return dirs


def compare_with_pooled(sites, cfg: PrepareConfig) -> dict:
    """Federated (combined per-site statistics) versus the pooled training patients of all sites, per modality:
    largest absolute differences of every statistic and of F (against sklearn's ``f_classif`` on the pooled,
    mean-imputed matrix), and whether the selected features equal sklearn's ``SelectKBest`` on the pooled
    pipeline (missing filter, mean imputation, min-max scaling, variance filter)."""
    import numpy as np
    import pandas as pd
    from sklearn.feature_selection import SelectKBest, f_classif
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import MinMaxScaler

    from magnet_core.cohort.preprocess import STAT_FIELDS, compute_stats, prepare_pooled_decisions

    manifest, preps, combined = prepare_pooled_decisions(sites, cfg)
    num_classes = len(manifest.classes)
    out = {}
    for m, stats in combined.items():
        pooled = pd.concat([s.frames[m].loc[s.frames[m].index.isin(s.train_ids)] for s in sites if m in s.frames])
        pooled = pooled.reindex(columns=stats.features)  # a site lacking a feature: missing cells
        y = pd.concat([s.labels for s in sites]).loc[pooled.index].to_numpy()
        ref = compute_stats(pooled, y, num_classes)
        diff = {f: float(np.max(np.abs(np.nan_to_num(getattr(stats, f) - getattr(ref, f), nan=0.0))))
                for f in STAT_FIELDS}
        keep = (pooled.isna().mean(axis=0) <= cfg.max_missing_fraction + 1e-12).to_numpy()
        imputed = SimpleImputer(strategy="mean", keep_empty_features=True).fit(pooled.to_numpy())
        x = imputed.transform(pooled.to_numpy())
        f_sk, _ = f_classif(x, y)
        f_ours = preps[m].table["f"].to_numpy()
        ok = keep & np.isfinite(f_sk)
        scaler = MinMaxScaler().fit(x[:, keep])
        scaled = scaler.transform(x[:, keep])
        var = pd.DataFrame(scaled).var(ddof=cfg.variance_ddof).to_numpy()
        span = scaler.data_max_ - scaler.data_min_
        keep_var = (var >= cfg.variance_threshold.get(m, 0.0)) & (span > 0)
        names = np.asarray(stats.features)[keep][keep_var]
        k = cfg.features_for(m)
        chosen = names if k >= len(names) else names[SelectKBest(f_classif, k=k).fit(
            scaled[:, keep_var], y).get_support()]
        sel = [preps[m].features.index(f) for f in chosen] if set(chosen) == set(preps[m].features) else None
        out[m] = {"training_patients": int(len(y)), "features_in": len(stats.features),
                  "max_abs_diff": diff,
                  "max_abs_diff_f": float(np.max(np.abs(f_ours[ok] - f_sk[ok]))),
                  "max_rel_diff_f": float(np.max(np.abs(f_ours[ok] - f_sk[ok]) / np.abs(f_sk[ok]))),
                  "max_abs_diff_impute_means": float(np.max(np.abs(
                      preps[m].impute_means - imputed.statistics_[[stats.features.index(f) for f in
                                                                    preps[m].features]]))),
                  "selected": len(preps[m].features), "selection_equal": list(chosen) == preps[m].features,
                  "same_order": sel == sorted(sel) if sel is not None else False}
    return out


def _content(path: Path) -> bytes:
    """A file's bytes, decompressed for .gz (whose header holds a timestamp)."""
    import gzip

    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def declared_ranges(cohort_dir: str | Path) -> dict[str, tuple[float, float]]:
    """A simulation's stand-in for the ranges a consortium declares in advance (e.g. an assay's published scale):
    each modality's range over the whole cohort, rounded outward to integers."""
    import math

    import pandas as pd

    from magnet_core.cohort.data import _modality_files

    out = {}
    for m, p in _modality_files(Path(cohort_dir)).items():
        frame = pd.read_csv(p, index_col=0)
        out[m] = (float(math.floor(frame.min().min())), float(math.ceil(frame.max().max())))
    return out


def measure(cohort_dir: str | Path, work: str | Path, num_sites: int = 3, n_features: int = 100,
            flower: bool = False) -> dict:
    """Federated vs pooled on a real cohort dealt to ``num_sites`` sites (one mRNA matrix transposed): the
    differences of :func:`compare_with_pooled`, the protocol run in-process (k-rule, declared ranges), the same
    with secure aggregation of the statistics (and through Flower)."""
    import numpy as np

    from magnet_core.cohort.manifest import ConsortiumManifest
    from magnet_core.cohort.preprocess import load_raw_site_dir, prepare_pooled_decisions

    work = Path(work)
    dirs = write_simulated_sites(cohort_dir, work / "raw", num_sites, transpose=(num_sites - 1, "mRNA"))
    cfg = PrepareConfig(n_features=n_features, value_ranges=declared_ranges(cohort_dir))
    sites = [load_raw_site_dir(d, cfg, log=lambda *_: None) for d in dirs]
    result = {"pooled": compare_with_pooled(sites, cfg), "value_ranges": cfg.value_ranges}
    inproc = run_inprocess(make_run(site_specs(dirs, work / "inprocess"), work / "inprocess", cfg))
    result["inprocess_seconds"] = inproc["wall_seconds"]
    secure = run_inprocess(make_run(site_specs(dirs, work / "secure"), work / "secure", cfg, secagg=True))
    a = ConsortiumManifest.load(work / "inprocess" / "manifest.toml")
    b = ConsortiumManifest.load(work / "secure" / "manifest.toml")
    pooled, _, _ = prepare_pooled_decisions(sites, cfg)
    result["withheld"] = {s["site"]: s["withheld"] for s in inproc["sites"]}
    result["selection_equal_to_pooled"] = {m.name: m.features == pooled.modality(m.name).features
                                           for m in a.modalities}
    result["secure"] = {
        "wall_seconds": secure["wall_seconds"], "secure_sum_seconds": secure["secure_aggregation"]["seconds"],
        "bytes_per_site": secure["secure_aggregation"]["bytes_per_site"],
        "same_features_as_clear": [m.features for m in a.modalities] == [m.features for m in b.modalities],
        "max_abs_diff_impute_means": max(float(np.max(np.abs(np.subtract(x.impute_means, y.impute_means))))
                                         for x, y in zip(a.modalities, b.modalities))}
    if flower:
        fl = run_flower(make_run(site_specs(dirs, work / "flower"), work / "flower", cfg))
        a = ConsortiumManifest.load(work / "inprocess" / "manifest.toml")
        b = ConsortiumManifest.load(work / "flower" / "manifest.toml")
        same_files = all(_content(p) == _content(work / "flower" / p.relative_to(work / "inprocess"))
                         for p in (work / "inprocess").rglob("*") if p.is_file() and p.name != "prepare_report.json")
        result["flower"] = {"wall_seconds": fl["wall_seconds"], "manifest_equal": a == b,
                            "prepared_files_identical": same_files}
    return result


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="federated vs pooled preprocessing on a real cohort")
    parser.add_argument("cohort", help="cohort-layout folder (labels.csv + modality files)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--flower", action="store_true", help="also run through Flower's simulation engine")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(a.cohort, tmp, a.sites, a.n_features, a.flower), indent=1))
