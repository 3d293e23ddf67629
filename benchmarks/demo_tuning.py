"""How the first run's generated cohort and scenario were chosen (issue 25 item 4), on seeds 1, 2 and 3 only.

Each candidate is a set of make_generated_cohort settings and a scenario; the script runs simulate's default methods
(in-process, 5 rounds x 10 local epochs, as the README's first command) and stores every method's MCC on both
evaluations, per seed. The reported seeds (10, 20, 30; benchmarks/results/demo.json) are never run here.

    python benchmarks/demo_tuning.py --out benchmarks/results/demo_tuning.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from magnet_core.model.threads import apply_thread_policy

apply_thread_policy()  # before torch loads (simulations.simulate imports it): one thread under MAGNET_FL_THREADS=1

from magnet_core.cohort.generated import GENERATED_VARIANTS  # noqa: E402
from simulations.simulate import RunSpec, run_methods  # noqa: E402

TUNING_SEEDS = (1, 2, 3)
BUILTIN = Path(__file__).resolve().parents[1] / "magnet_core" / "consortium" / "builtin"
# name -> (generator settings, scenario)
CANDIDATES: dict[str, tuple[dict, str]] = {
    "n360-s0.45-demo6": ({"n": 360, "signal": 0.45}, "demo-6"),
    "n360-s0.3-demo6": ({"n": 360, "signal": 0.3}, "demo-6"),
    "n360-s0.6-demo6": ({"n": 360, "signal": 0.6}, "demo-6"),
    "n360-s0.8-demo6": ({"n": 360, "signal": 0.8}, "demo-6"),
    # second round (class centres at a fixed distance, so that a seed does not change how hard the task is);
    # rule declared before running: keep the candidate (of all above) with the largest lower 95% bound of
    # federated - local-only on the own sites' test patients over seeds 1-3
    "n360-s0.5-eq-demo6": ({"n": 360, "signal": 0.5, "equal_separation": True}, "demo-6"),
    "n360-s0.6-eq-demo6": ({"n": 360, "signal": 0.6, "equal_separation": True}, "demo-6"),
    "n360-s0.8-eq-c3-demo6": ({"n": 360, "signal": 0.8, "equal_separation": True, "num_classes": 3}, "demo-6"),
}
# Outcome of the second round (benchmarks/results/demo_tuning.json): federated - local-only on the own sites' test
# patients, mean [95% CI] over seeds 1-3: n360-s0.6-eq +0.048 [-0.156, +0.253], n360-s0.8-eq-c3 +0.012 [-0.032,
# +0.056] (first round: s0.45 +0.145 [+0.018, +0.272], s0.6 +0.188 [-0.029, +0.404]). Fixed centres made one site's
# model as good as the consortium's on its own patients; neither new candidate is kept. The rule as written would
# pick the first round's s0.45, but its numbers were known when the rule was written, and the current cohort's
# reported seeds (10, 20, 30) had been seen: switching now would choose with the reported seeds in view, so the demo
# cohort stays n360-s0.6 (chosen in the first round by its own rule, before seeds 10, 20, 30 were run).


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    p.add_argument("--methods", default="federated,centralized,local_only")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CANDIDATES)
    found = json.loads(args.out.read_text()) if args.out.exists() else {"candidates": {}}
    for name in names:
        settings, scenario = CANDIDATES[name]
        GENERATED_VARIANTS[f"tune-{name}"] = settings  # registered for this process only
        rows = []
        for seed in TUNING_SEEDS:
            spec = RunSpec(data_path=f"generated:tune-{name}", scenario=scenario, seed=seed, rounds=5,
                           local_epochs=10, out_dir=Path("/tmp/demo_tuning") / name)
            t0 = time.perf_counter()
            results, _, seconds = run_methods(spec, args.methods.split(","))
            rows.append({"seed": seed, "seconds": time.perf_counter() - t0, "method_seconds": seconds,
                         "mcc": {m: r.get("mcc") for m, r in results.items() if not m.endswith("_server")},
                         "consortium_mcc": {m: r.get("consortium_mcc") for m, r in results.items()
                                            if not m.endswith("_server")}})
            print(name, rows[-1], flush=True)
        found["candidates"][name] = {"settings": settings, "scenario": scenario, "seeds": rows,
                                     "loadavg": os.getloadavg()}
        args.out.write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
