"""The README's first run, measured (issue 25 item 4): its time, and its table over the reported seeds.

1. Times the README's simulate command as printed (`magnet-fl simulate --rounds 5 --seeds 10 --engine inprocess`),
   a fresh process, with the load average before and after (the machine may be shared).
2. Runs the same command with seeds 10, 20 and 30 (never used to choose the demo cohort: benchmarks/demo_tuning.py
   uses 1, 2 and 3) and stores each method's MCC per seed on both evaluations (own sites' / consortium test
   patients) and the paired differences federated - local-only and federated - centralized with 95% t intervals.

    MAGNET_FL_THREADS=1 python benchmarks/demo_results.py --out benchmarks/results/demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations import statistics as st
from simulations.reporting import write_json

README_ARGS = ["simulate", "--rounds", "5", "--seeds", "10", "--engine", "inprocess"]
REPORTED_SEEDS = "10,20,30"
PAIRS = (("federated", "local_only"), ("federated", "centralized"), ("fedavg_plain", "local_only"))
EVALUATIONS = {"own": "", "consortium": "consortium_"}


def simulate(args: list[str], out: Path) -> tuple[float, float]:
    """Run magnet-fl in a fresh process (as a user would); return its wall and CPU (user + system) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "simulations.cli", *args, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary(results: dict) -> dict:
    """Per evaluation: each method's MCC per seed (and the sites/patients it is pooled over), and paired
    differences with their 95% t intervals."""
    seeds = results["seeds"]
    out: dict = {}
    for name, prefix in EVALUATIONS.items():
        per_method = {m: dict(zip(seeds, r[f"{prefix}mcc"]["per_seed"])) for m, r in results["results"].items()}
        pooled = {m: {"sites": r[f"{prefix}sites"]["per_seed"], "patients": r[f"{prefix}patients"]["per_seed"],
                      "models": r[f"{prefix}models"]["per_seed"]} for m, r in results["results"].items()}
        diffs = {}
        for a, b in PAIRS:
            if a in per_method and b in per_method:
                c = st.paired_comparison(per_method[a], per_method[b])
                diffs[f"{a} - {b}"] = {"per_seed": [per_method[a][s] - per_method[b][s] for s in seeds],
                                       **c.to_dict()}
        out[name] = {"mcc_per_seed": {m: [v[s] for s in seeds] for m, v in per_method.items()},
                     "mcc_mean": {m: sum(v.values()) / len(v) for m, v in per_method.items()},
                     "pooled_over": pooled, "paired_differences": diffs}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        load_before = os.getloadavg()
        one_seed, one_seed_cpu = simulate(README_ARGS, Path(tmp) / "one")
        load_after = os.getloadavg()
        three, three_cpu = simulate([*README_ARGS[:4], REPORTED_SEEDS, *README_ARGS[5:]], Path(tmp) / "three")
        results = json.loads((Path(tmp) / "three" / "results.json").read_text())
    payload = {
        "command": "magnet-fl " + " ".join(README_ARGS) + " --out runs/demo",
        "reproduce": "MAGNET_FL_THREADS=1 python benchmarks/demo_results.py --out benchmarks/results/demo.json",
        "threads": os.environ.get("MAGNET_FL_THREADS"), "cpus": os.cpu_count(),
        "readme_command_seconds": one_seed, "readme_command_cpu_seconds": one_seed_cpu,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "three_seed_seconds": three, "three_seed_cpu_seconds": three_cpu,
        "seeds": results["seeds"], "data": results["data"],
        "scenario": results["scenario"]["name"], "methods": results["methods"],
        "note": "seeds 10, 20, 30 were not used to choose the generated cohort (benchmarks/demo_tuning.py: 1, 2, 3); "
                "95% t intervals over 3 seeds (t with 2 degrees of freedom); std ddof 1",
        **summary(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, payload)  # strict JSON: a missing value (NaN) is written as null
    print(json.dumps({k: payload[k] for k in ("readme_command_seconds", "readme_command_cpu_seconds",
                                                       "loadavg_before", "three_seed_seconds")}))
    for name in EVALUATIONS:
        print(name, json.dumps(payload[name]["mcc_mean"]), json.dumps(
            {k: (round(v["mean_diff"], 3), round(v["ci_low"], 3), round(v["ci_high"], 3))
             for k, v in payload[name]["paired_differences"].items()}))


if __name__ == "__main__":
    main()
