"""Where the label-skew gap comes from: one optimiser over all sites' patients, but on site-local graphs.

Federated MAGNET never links patients of two sites: each site builds its patient graph over its own patients. The
studies' centralized reference pools every site's training patients into one graph. A federated method therefore
differs from centralized in two ways at once: (1) the graph (site-local blocks vs one pooled graph) and (2) the
optimisation (local epochs at each site, then averaged, vs one optimiser over all patients). This diagnostic
separates them on a study's cells and seeds. For each (cell, seed) it trains, in this process:

- ``centralized``: the study's centralized reference, recomputed exactly as the study runs it
  (``simulations.simulate.run_methods``), and compared bit for bit with the stored row;
- ``site_graphs``: the same model, initial weights, patients (same order), RNG stream, epochs and optimiser, but the
  graph is the block-diagonal union of the sites' own training graphs (what the sites build in a federated run).

Both are scored on the consortium's test patients exactly as the study scores every method (each site's test
patients on its own test graph, released under k and pooled).

Declared before any run of this script (the comparisons, the multiplicity and the reading; written into the result
file before the numbers):

- primary, per cell: ``site_graphs - centralized`` (consortium test MCC, paired by seed, 95% t interval): the cost
  of the graph partition alone. Holm over the cells.
- secondary, per cell: the study rule's named method (``best_method.chosen`` of the stored summary)
  ``- site_graphs``: what federated optimisation costs on top of the partition. Holm over the cells.
- reading: an interval that excludes 0 says that part of the gap is detected; one that contains 0 detects nothing,
  and says nothing more.

Added after the first two runs, declared before the run that has it (``tertiary`` in the result): the same two models
also scored with every test-graph edge removed (each test patient scored alone: the graph layers see no
neighbour), ``site_graphs - centralized`` paired by seed, Holm over the cells. If the primary difference comes
through the test graph (at a label-skewed site, a test patient's neighbours share the site's label mix), it should
shrink there; both models are then outside what they were trained on, which this cannot separate.

    MAGNET_FL_THREADS=1 python benchmarks/graph_partition.py --data ../shared/data --study docs/studies/label-skew \\
        --cells rjive-label-skew-3,alpha-0.1,alpha-1.0 --threads alpha-0.1=2,alpha-1.0=2 \\
        --result benchmarks/results/graph_partition_label_skew.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from magnet_core.consortium.simulated import load_consortium  # noqa: E402
from magnet_core.model.config import get_preset  # noqa: E402
from magnet_core.model.graph import PatientGraph  # noqa: E402
from magnet_core.model.site import isolated  # noqa: E402
from magnet_core.model.train import PatientSet, split_sets  # noqa: E402
from simulations import statistics as st  # noqa: E402
from simulations.pooled_evaluation import CONSORTIUM  # noqa: E402
from simulations.reporting import write_json  # noqa: E402
from simulations.simulate import (  # noqa: E402
    concat_cohorts,
    evaluated_both_ways,
    fresh_runtime,
    release_settings,
    scoring_runtime,
    train_alone,
)
from simulations.study import load_study, resolve_dataset  # noqa: E402

METRIC = f"{CONSORTIUM}mcc"
DECLARED = {
    "tertiary": "site_graphs - centralized with every test-graph edge removed, per cell, paired by seed, Holm over "
                "the cells (added after the first two runs, before the run that has it)",
    "primary": "site_graphs - centralized, per cell, paired by seed, 95% t interval, Holm over the cells",
    "secondary": "the study rule's named method (stored best_method.chosen) - site_graphs, per cell, Holm over the "
                 "cells",
    "reading": "an interval that excludes 0 says that part of the gap is detected; one that contains 0 detects "
               "nothing",
}


def block_diagonal(parts: list[PatientSet]) -> PatientSet:
    """The patients of ``parts`` in order, each part's graph kept and no edge between parts."""
    offsets = np.cumsum([0] + [p.n for p in parts[:-1]])
    edges = torch.cat([p.graph.edge_index + int(o) for p, o in zip(parts, offsets)], dim=1)
    rules = {p.graph.rule for p in parts}
    graph = PatientGraph(edges, torch.cat([p.graph.edge_weight for p in parts]), sum(p.n for p in parts),
                         "dense" if rules == {"dense"} else "topk")
    return PatientSet([torch.cat([p.xs[j] for p in parts]) for j in range(len(parts[0].xs))],
                      torch.cat([p.mask for p in parts]), torch.cat([p.y for p in parts]),
                      torch.cat([p.paired for p in parts]), graph)


def without_test_edges(runtime):
    """``runtime`` with its test patients' graph emptied: each test patient is scored alone (what the test-graph
    rule "isolated" scores, :func:`magnet_core.model.site.isolated`)."""
    return dataclasses.replace(runtime, test=isolated(runtime.test))


def run_pair(study, cell, seed: int, data: Path, scenario_file: Path) -> dict:
    """(cell, seed): centralized and site_graphs, both scored on the consortium's test patients."""
    preset = get_preset(cell.preset or study.preset)
    data_path = str(resolve_dataset(data, cell.dataset or study.dataset))
    _, sites = load_consortium(data_path, str(scenario_file), seed, ",".join(cell.modalities))
    sites = list(sites)
    runtimes = [scoring_runtime(s.name, s, preset) for s in sites]
    overrides = study.overrides_of(cell)
    release, secure = release_settings(overrides), bool(overrides.get("secure_evaluation"))
    epochs = study.rounds * study.local_epochs
    out = {}
    for name in ("centralized", "site_graphs"):
        t0 = time.perf_counter()
        pooled = fresh_runtime("pooled", concat_cohorts(sites), preset, seed)  # same initial weights for both
        if name == "site_graphs":
            parts = [split_sets(s, preset.graph.sparsity, preset.graph.rule, preset.graph.k)[0] for s in sites]
            local = block_diagonal(parts)
            assert torch.equal(local.y, pooled.train.y) and all(torch.equal(a, b) for a, b in
                                                                 zip(local.xs, pooled.train.xs))
            pooled = dataclasses.replace(pooled, train=local)
        params = train_alone(pooled, preset, epochs, seed)
        metrics = evaluated_both_ways(runtimes, {name: params}, study.test_graph_of(cell), release, secure)
        alone = evaluated_both_ways([without_test_edges(r) for r in runtimes], {name: params}, "among-test",
                                    release, secure)
        out[name] = {"consortium_mcc": metrics[METRIC], "mcc": metrics["mcc"],
                     "consortium_mcc_no_test_edges": alone[METRIC],
                     "train_edges": pooled.train.graph.num_edges, "seconds": time.perf_counter() - t0}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--study", type=Path, required=True, help="a stored study folder (study.toml, *_tidy.csv, "
                                                             "*_summary.json)")
    p.add_argument("--cells", required=True, help="comma-separated cell ids")
    p.add_argument("--seeds", help="comma-separated (default: the cell's seeds in the stored table)")
    p.add_argument("--threads", default="", help="torch threads per cell, e.g. alpha-0.1=2,alpha-1.0=2 (default: "
                                                 "this process's; the stored rows' own count reproduces them)")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()  # MAGNET_FL_THREADS (else the machine's default); --threads overrides it per cell
    threads = {k: int(v) for k, v in (item.split("=") for item in args.threads.split(",") if item)}
    default_threads = torch.get_num_threads()  # a cell not named in --threads, whatever ran before it
    study = load_study(args.study / "study.toml")
    tidy = pd.read_csv(next(args.study.glob("*_tidy.csv")))
    summary = json.loads(next(args.study.glob("*_summary.json")).read_text())
    chosen = summary["best_method"]["chosen"]
    cells = {c.id: c for c in study.cells}
    result = {"declared": DECLARED, "study": str(args.study), "torch": torch.__version__, "cells": {}}
    write_json(args.result, result)  # the declaration is in the file before any number
    tmp = Path(tempfile.mkdtemp(prefix="graph-partition-"))
    for cid in args.cells.split(","):
        cell = cells[cid]
        torch.set_num_threads(threads.get(cid, default_threads))
        scenario_file = tmp / f"{cid}.toml"
        scenario_file.write_text(tomli_w.dumps(study.scenario_of(cell).model_dump(mode="json", exclude_none=True)))
        rows = tidy[tidy["cell"] == cid]
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else sorted(rows["seed"].unique().tolist())
        stored = {m: dict(zip(g["seed"], g[METRIC])) for m, g in rows.groupby("method")}
        named = chosen[cid]
        per_seed = {}
        for seed in seeds:
            run = run_pair(study, cell, seed, args.data, scenario_file)
            run["stored_centralized"] = float(stored["centralized"][seed])
            run["centralized_reproduced"] = run["centralized"]["consortium_mcc"] == run["stored_centralized"]
            run["stored_named"] = float(stored[named][seed])
            per_seed[seed] = run
            print(f"{cid} seed {seed}: centralized {run['centralized']['consortium_mcc']:.4f} (stored "
                  f"{run['stored_centralized']:.4f}), site graphs {run['site_graphs']['consortium_mcc']:.4f}, "
                  f"{named} {run['stored_named']:.4f}", flush=True)
        central = {s: r["centralized"]["consortium_mcc"] for s, r in per_seed.items()}
        local = {s: r["site_graphs"]["consortium_mcc"] for s, r in per_seed.items()}
        fed = {s: r["stored_named"] for s, r in per_seed.items()}
        result["cells"][cid] = {
            "named_method": named, "threads": torch.get_num_threads(),
            "seeds": {str(s): r for s, r in per_seed.items()},
            "all_centralized_reproduced": all(r["centralized_reproduced"] for r in per_seed.values()),
            "means": {"centralized": float(np.mean(list(central.values()))),
                      "site_graphs": float(np.mean(list(local.values()))),
                      named: float(np.mean(list(fed.values())))},
            "primary": st.paired_comparison(local, central).to_dict(),
            "secondary": st.paired_comparison(fed, local).to_dict(),
            "tertiary": st.paired_comparison(
                {s: r["site_graphs"]["consortium_mcc_no_test_edges"] for s, r in per_seed.items()},
                {s: r["centralized"]["consortium_mcc_no_test_edges"] for s, r in per_seed.items()}).to_dict()}
        write_json(args.result, result)
    for key in ("primary", "secondary", "tertiary"):
        ps = [result["cells"][c][key]["p_value"] for c in result["cells"]]
        for c, adj in zip(result["cells"], st.holm(ps)):
            result["cells"][c][key]["holm_p"] = float(adj)
    write_json(args.result, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
