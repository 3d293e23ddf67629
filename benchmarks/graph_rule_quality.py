"""What the sparse graph costs in accuracy: centralized test MCC with MAGNET's dense quantile rule vs the top-k
(k-NN) rule, same seeds, same everything else, on real cohorts; writes benchmarks/results/graph_rule_quality.json."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COHORTS = {"tcga-ov-magnet": "ov", "tcga-brca-rjive": "brca"}  # folder -> preset


def main() -> int:
    from magnet_core.model.threads import apply_thread_policy

    policy = apply_thread_policy()
    from magnet_core.cohort.data import load_for_seed
    from magnet_core.model.config import get_preset
    from magnet_core.model.metrics import metrics_with_groups
    from magnet_core.model.train import fit_and_predict
    from simulations.statistics import paired_comparison

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=os.environ.get("MAGNET_FL_DATA", "../shared/data"),
                    help="folder holding the cohorts (default $MAGNET_FL_DATA)")
    ap.add_argument("--cohorts", default=",".join(COHORTS))
    ap.add_argument("--seeds", default="10,20,30,40,50")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's 200)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "graph_rule_quality.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, summary = [], {}
    for name in args.cohorts.split(","):
        path = Path(args.data) / name
        if not path.is_dir():
            sys.exit(f"error: {path}: no such directory (pass --data or set MAGNET_FL_DATA)")
        preset = get_preset(COHORTS.get(name, "ov"))
        train_cfg = preset.train if args.epochs is None else preset.train.model_copy(update={"epochs": args.epochs})
        for seed in seeds:
            cohort = load_for_seed(path, seed, log=lambda *a: None)
            for rule in ("dense", "topk"):
                t0 = time.perf_counter()
                _, test, probs = fit_and_predict(cohort, preset.model, train_cfg, preset.graph, seed,
                                                 graph=rule, k=args.k)
                m = metrics_with_groups(test.y.numpy(), probs.numpy(), test.paired.numpy(), cohort.num_classes)
                rows.append({"cohort": name, "seed": seed, "rule": rule, "mcc": m["mcc"], "acc": m["acc"],
                             "seconds": time.perf_counter() - t0})
                print(f"{name} seed {seed} {rule:>5}: test MCC {m['mcc']:.3f} acc {m['acc']:.3f} "
                      f"({rows[-1]['seconds']:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        for rule in ("dense", "topk"):
            v = [r["mcc"] for r in rows if r["cohort"] == name and r["rule"] == rule]
            summary[f"{name}/{rule}"] = {"mcc_mean": statistics.mean(v), "mcc_std": statistics.stdev(v) if len(v) > 1
                                         else 0.0, "per_seed": v}
        d = [r["mcc"] for r in rows if r["cohort"] == name and r["rule"] == "dense"]
        t = [r["mcc"] for r in rows if r["cohort"] == name and r["rule"] == "topk"]
        c = paired_comparison(dict(zip(seeds, t)), dict(zip(seeds, d)))  # top-k minus dense, paired by seed
        summary[f"{name}/topk-dense"] = {"mean": c.mean_diff, "std": c.std_diff, "ci95": [c.ci_low, c.ci_high],
                                         "p_value": c.p_value, "n": c.n, "verdict": c.verdict}
    print(f"\ntest MCC over seeds {seeds}, {args.epochs or 'preset'} epochs, k = {args.k}:")
    for key, val in summary.items():
        if "mcc_mean" in val:
            print(f"  {key:<28} {val['mcc_mean']:.3f} ± {val['mcc_std']:.3f}")
        else:
            print(f"  {key:<28} paired difference {val['mean']:+.3f} (95% CI {val['ci95'][0]:+.3f} to "
                  f"{val['ci95'][1]:+.3f}, paired t-test p = {val['p_value']:.3f}, n = {val['n']}): {val['verdict']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "graph_rule_quality", "command": " ".join(sys.argv),
                                          "epochs": args.epochs or 200, "k": args.k, "threads": policy.threads,
                                          "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
