"""One in-band attacker among three sites, and two colluders among four, against the real strategy and round loop
(issue 22, item 2): per-round held-out MCC of the attacked run against the honest run of the same seed and rule.

Cases (``--cases``, each run per seed and per aggregation rule ``--rules``):

* ``honest3``: three honest sites (also the honest-cost runs: ``--rules mean,auto``);
* ``attacked3``: site0 (node 1) replaced by the issue's in-band model replacer (steps 9.5x its honest norm, cosine
  0.05 with its own honest step, the rest toward a constant-class model; ``tests/test_robust.py``);
* ``absent3``: site0 sends no update (trains nothing; the run without the attacker's site);
* ``honest4`` / ``colluders4``: four sites, two of them (nodes 1, 2) sending sign-flipped steps.

The honest run of a case is the run of the same seed, rule and number of sites with every site honest. The metric is
the coordinator's held-out MCC (``server``: the cohort's test patients, one graph among them) after each round.
The attacker code is the tests' (tests/test_robust.py, tests/test_adversarial.py); production has no hook.

    MAGNET_FL_THREADS=1 FLWR_TELEMETRY_ENABLED=0 nice -n 19 python benchmarks/inband_attacker.py \
        --data /work/shared/data/tcga-ov-magnet --scenario iid --seeds 10,20,30,40,50 --rounds 5 --rules auto \
        --cases attacked3,absent3 --out benchmarks/results/inband_attacker_ov.json

The honest run of the bar is ``absent3`` (the attacker's site sends nothing: the run of the honest sites alone, the
issue's "without the attacker"); ``honest3`` (all three honest) is compared as well. ``--merge`` joins result
files of separate jobs (same settings) and adds the honest cost: final-round MCC of honest3 under each rule minus
under ``mean`` (the previous default), paired by seed, with a 95% t interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the attackers live with the tests


def run_case(case: str, data: str, scenario: str, seed: int, rounds: int, epochs: int, rule: str, preset: str,
             work: Path, extra: dict) -> dict:
    from flwr.app import Context, RecordDict
    from test_adversarial import AttackGrid
    from test_robust import _absent_from_training, _sign_flip, _steer_to_one_class

    from flower_compat.simulation import enter_task_identity
    from server.app import server_main
    from server.config import FederatedConfig

    sites = 4 if case.endswith("4") else 3
    attacks = {"attacked3": {1: _steer_to_one_class}, "absent3": {1: _absent_from_training},
               "colluders4": {1: _sign_flip, 2: _sign_flip}}.get(case, {})
    enter_task_identity()
    toml = work / f"{scenario}-{sites}.toml"
    toml.write_text(f'name = "{scenario}-{sites}"\nnum_sites = {sites}\npartition = "{scenario}"\n'
                    + ("alpha = 0.5\n" if scenario == "label-skew" else ""))
    cfg = FederatedConfig(num_server_rounds=rounds, local_epochs=epochs, data_path=data, scenario=str(toml),
                          min_sites=1, server_eval=True, seed=seed, out_dir=str(work / f"{case}-{rule}-{seed}"),
                          robust=rule, report=False, overwrite=True,
                          **({"preset": preset} if preset else {}), **extra)
    grid = AttackGrid(sites, cfg.to_run_config(), attacks)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    t0 = time.process_time()
    _, history = server_main(grid, ctx)
    return {"case": case, "rule": rule, "seed": seed, "sites": sites,
            "server_mcc": [r["server"]["mcc"] for r in history],
            "global_mcc": [r["global"]["mcc"] for r in history],
            "accepted": [sorted(r["accepted"]) for r in history],
            "rejected": [sorted(r["rejected"]) for r in history],
            "aggregator": [(r.get("screening") or {}).get("aggregator") for r in history],
            "cpu_seconds": time.process_time() - t0}


def paired_cost(rows: list[dict], rule: str, against: str, metric: str) -> dict | None:
    """Honest cost: final-round ``metric`` of honest3 runs under ``rule`` minus under ``against``, paired by seed;
    mean and 95% t interval."""
    from scipy import stats

    a = {r["seed"]: r[metric][-1] for r in rows if r["case"] == "honest3" and r["rule"] == rule}
    b = {r["seed"]: r[metric][-1] for r in rows if r["case"] == "honest3" and r["rule"] == against}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = float(np.mean(diffs))
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
    return {"comparison": f"{rule} - {against}", "metric": f"final-round {metric}", "seeds": seeds,
            "differences": diffs, "mean": mean, "ci95": [mean - half, mean + half]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/work/shared/data/tcga-ov-magnet")
    p.add_argument("--scenario", default="iid", choices=["iid", "label-skew"])
    p.add_argument("--preset", default="", help="model preset (empty: the default)")
    p.add_argument("--seeds", default="10")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rules", default="mean,median", help="robust= values to compare (e.g. mean,median,auto)")
    p.add_argument("--cases", default="honest3,attacked3")
    p.add_argument("--purpose", default="", help="tuning (choosing the rule) or evaluation (seeds not used to choose)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="only merge the runs of these result files (same settings) into --out")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    if args.merge:
        for f in args.merge:
            rows += [r for r in json.loads(f.read_text())["runs"]
                     if (r["case"], r["rule"], r["seed"]) not in {(x["case"], x["rule"], x["seed"]) for x in rows}]
        _write(args, rows, os.getloadavg()[0])
        return
    done = {(r["case"], r["rule"], r["seed"]) for r in rows}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for rule in args.rules.split(","):
                for case in args.cases.split(","):
                    if (case, rule, seed) in done:
                        continue
                    row = run_case(case, args.data, args.scenario, seed, args.rounds, args.epochs, rule,
                                   args.preset, Path(tmp), {})
                    rows.append(row)
                    print(json.dumps({k: row[k] for k in ("case", "rule", "seed", "server_mcc", "cpu_seconds")}),
                          flush=True)
                    _write(args, rows, load)
    _write(args, rows, load)


def noise_floor(rows: list[dict], rounds: int = 5) -> list[dict]:
    """How far two runs WITHOUT an attacker move apart, per round after the first (the floor under the two-sided bar):
    all three sites honest vs the attacker's site absent (same rule), and the same honest sites under a rule vs under
    ``mean``. Per seed: the per-round differences over the first ``rounds`` rounds and whether every one after the
    first is within 0.05."""
    by = {(r["case"], r["rule"], r["seed"]): r for r in rows}
    out = []
    for (case, rule, seed), r in sorted(by.items()):
        if case != "honest3":
            continue
        pairs = [(("absent3", rule, seed), "honest3 - absent3")]
        if rule != "mean":
            pairs.append((("honest3", "mean", seed), f"honest3 {rule} - honest3 mean"))
        for key, what in pairs:
            other = by.get(key)
            if other is None:
                continue
            diff = [a - b for a, b in zip(r["server_mcc"][:rounds], other["server_mcc"][:rounds])]
            out.append({"pair": what, "rule": rule, "seed": seed, "difference": diff,
                        "max_abs_after_round_1": max(map(abs, diff[1:])),
                        "within_0.05_every_round_after_the_first": all(abs(d) <= 0.05 for d in diff[1:])})
    return out


def _write(args, rows: list[dict], load: float) -> None:
    by = {(r["case"], r["rule"], r["seed"]): r for r in rows}
    gaps = []
    for (case, rule, seed), r in sorted(by.items()):
        if case not in ("attacked3", "colluders4"):
            continue
        for against in ("honest" + case[-1], "absent3" if case == "attacked3" else None):
            honest = by.get((against, rule, seed))
            if honest is None:
                continue
            diff = [a - h for a, h in zip(r["server_mcc"], honest["server_mcc"])]
            gaps.append({"case": case, "against": against, "rule": rule, "seed": seed, "difference": diff,
                         "max_abs_after_round_1": max(map(abs, diff[1:])) if len(diff) > 1 else None,
                         "within_0.05_every_round_after_the_first": all(abs(d) <= 0.05 for d in diff[1:])})
    out = {"what": f"{Path(args.data).name} {args.scenario}, {args.rounds} rounds x {args.epochs} local epochs, "
                   "in-process real round loop; held-out (coordinator's test patients) MCC per round",
           "command": "MAGNET_FL_THREADS=1 FLWR_TELEMETRY_ENABLED=0 nice -n 19 python " + " ".join(sys.argv),
           "purpose": args.purpose, "seeds": sorted({r["seed"] for r in rows}),
           "threads": os.environ.get("MAGNET_FL_THREADS"), "load_average_start": load,
           "load_average_end": os.getloadavg()[0], "gaps": gaps, "noise_floor": noise_floor(rows),
           "honest_cost": [c for rule in sorted({r["rule"] for r in rows} - {"mean"}) for metric in
                           ("server_mcc", "global_mcc") if (c := paired_cost(rows, rule, "mean", metric))],
           "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
