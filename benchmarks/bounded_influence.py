"""The honest cost of bounded influence (issue 22, item 2): federated MAGNET on tcga-ov-magnet iid-3, no attacker,
the same seeds with each screening rule, paired by seed.

Variants (``--variant``, one per call; each call adds its rows to the result file):

* ``bounded``: this code's default (reject only out-of-band or opposed-and-large steps, clip every accepted step to
  the lower median norm, weight by enrolled share);
* ``unclipped``: the same rule without clipping (``clip-factor = 0``): what clipping costs;
* ``old-default``: the default of the code before the change (majority direction vote, agreement rule, clip to the
  median norm, trust weights). Run it with that code first on the path, e.g.
  ``git archive d89f934 | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python benchmarks/bounded_influence.py
  --variant old-default`` (the script records the commit it ran from, given by ``--code``).

The comparison, fixed before any result was seen: final-round pooled test MCC (the coordinator's global metric over
the sites' own test patients), bounded minus each other variant, paired by seed; mean and a 95% t interval over the
seeds (3 seeds: an interval this wide says little; two comparisons, no multiplicity correction).

    MAGNET_FL_THREADS=1 FLWR_TELEMETRY_ENABLED=0 python benchmarks/bounded_influence.py --variant bounded

``--scenario``, ``--preset`` and ``--result`` run another data set and scenario into its own file (e.g. BRCA r.jive
label-skew-3, ``results/bounded_influence_brca_label_skew.json``); seeds already in the file for a variant are kept,
not rerun, so ``--seeds`` can add seeds to a stored comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
from scipy import stats

RESULT = Path(__file__).resolve().parent / "results" / "bounded_influence.json"
VARIANTS = {"bounded": {}, "unclipped": {"clip_factor": 0.0}, "old-default": {}}


def run_one(data: str, seed: int, rounds: int, epochs: int, overrides: dict, out: Path, scenario: str = "iid-3",
            preset: str = "") -> dict:
    from simulations.engine import run_inprocess
    from simulations.simulate import method_config

    cfg = method_config("federated", data, scenario, seed, overrides, num_server_rounds=rounds, local_epochs=epochs,
                        min_sites=3, overwrite=True, report=False, out_dir=str(out),
                        **({"preset": preset} if preset else {}))
    t0 = time.process_time()
    _, history = run_inprocess(cfg, 3)
    last = history[-1]
    clip = [s for rec in history for s in ((rec.get("screening") or {}).get("clip") or {}).get("scale", {}).values()]
    return {"seed": seed, "mcc": last["global"]["mcc"], "mcc_per_round": [r["global"]["mcc"] for r in history],
            "rejected_updates": sum(len(r["rejected"]) for r in history),
            "accepted_updates": sum(len(r["accepted"]) for r in history),
            "clipped_updates": sum(s < 1.0 for s in clip), "mean_clip_scale": float(np.mean(clip)) if clip else None,
            "cpu_seconds": time.process_time() - t0}


def paired(a: list[dict], b: list[dict]) -> dict:
    by_seed = {r["seed"]: r["mcc"] for r in b}
    diffs = [r["mcc"] - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
    n = len(diffs)
    mean = float(np.mean(diffs)) if diffs else None
    half = float(stats.t.ppf(0.975, n - 1) * np.std(diffs, ddof=1) / np.sqrt(n)) if n > 1 else None
    return {"seeds": n, "differences": diffs, "mean": mean,
            "ci95": [mean - half, mean + half] if half is not None else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    p.add_argument("--data", default=os.path.join(os.environ.get("MAGNET_FL_DATA", "/work/shared/data"),
                                                  "tcga-ov-magnet"))
    p.add_argument("--seeds", default="10,20,30")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--code", default="this worktree", help="the commit the code on the path comes from")
    p.add_argument("--out", type=Path, default=Path("/tmp/bounded_influence_runs"))
    p.add_argument("--scenario", default="iid-3", help="built-in scenario (3 sites), e.g. label-skew-3")
    p.add_argument("--preset", default="", help="model preset (empty: the data's default), e.g. brca")
    p.add_argument("--result", type=Path, default=RESULT, help="result file (one per data set and scenario)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    result = json.loads(args.result.read_text()) if args.result.exists() else {}
    done = {r["seed"]: r for r in result.get("variants", {}).get(args.variant, {}).get("runs", [])}
    rows = [done.get(s) or run_one(args.data, s, args.rounds, args.epochs, VARIANTS[args.variant],
                                   args.out / f"{args.variant}-seed{s}", args.scenario, args.preset) for s in seeds]
    result.setdefault("settings", {"data": Path(args.data).name, "scenario": args.scenario, "rounds": args.rounds,
                                   "local_epochs": args.epochs, "threads": os.environ.get("MAGNET_FL_THREADS"),
                                   "metric": "final-round pooled test MCC (sites' own test patients)"})
    result.setdefault("variants", {})[args.variant] = {"code": args.code, "overrides": VARIANTS[args.variant],
                                                       "runs": rows, "load_average": os.getloadavg()[0],
                                                       "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                       / 1024}
    v = result["variants"]
    result["paired"] = {f"bounded - {o}": paired(v["bounded"]["runs"], v[o]["runs"])
                        for o in v if o != "bounded" and "bounded" in v}
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"variant": args.variant, "mcc": [r["mcc"] for r in rows], "paired": result["paired"]},
                     indent=1))


if __name__ == "__main__":
    main()
