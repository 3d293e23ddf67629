"""CPU time of ``magnet-fl centralized --preset ov`` for two code trees, run in alternating turns (A B A B ...).

Each turn is a fresh process of one tree (``--src label=path``; the tree's own code via PYTHONPATH, this venv's
packages) at ``MAGNET_FL_THREADS=1``; its CPU time is user + system time of the child process (getrusage), so the
machine's load changes it less than wall time (it still changes it: shared caches and memory bandwidth). Records per
turn the CPU and wall seconds, the 1-minute load average before and after, and the test MCC per seed (which must be
the same for both trees when the change keeps the numbers). Writes ``benchmarks/results/centralized_cpu_ab.json``.

    git worktree add --detach /tmp/before <old-commit>   # or: git archive <old-commit> | tar -x -C /tmp/before
    python benchmarks/centralized_cpu_ab.py --src before=/tmp/before --src after=. --seeds 10 --turns 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "centralized_cpu_ab.json"


def _default_data() -> Path:
    return Path(os.environ.get("MAGNET_FL_DATA", str(ROOT.parent / "shared" / "data"))) / "tcga-ov-magnet"


def _commit(src: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def turn(src: Path, data: Path, seeds: str, epochs: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="cpu-ab-") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "simulations.cli", "centralized", "--preset", "ov", "--data", str(data),
               "--seeds", seeds, "--out", str(out)] + (["--epochs", str(epochs)] if epochs else [])
        env = {**os.environ, "PYTHONPATH": str(src), "MAGNET_FL_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        load0, before = os.getloadavg(), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after, load1 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()
        if done.returncode != 0:
            sys.exit(f"error: {src}: {done.stderr[-2000:]}")
        res = json.loads((out / "results.json").read_text())
    mcc = res["metrics"]["mcc"]
    return {"cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "user_seconds": after.ru_utime - before.ru_utime, "system_seconds": after.ru_stime - before.ru_stime,
            "wall_seconds": wall, "load1_before_after": [load0[0], load1[0]],
            "mcc_per_seed": mcc["per_seed"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", required=True, help="label=path of a code tree (give two)")
    ap.add_argument("--data", type=Path, default=_default_data())
    ap.add_argument("--seeds", default="10,20,30,40,50")
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's 200")
    ap.add_argument("--turns", type=int, default=2, help="processes per tree, alternating")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    srcs = {label: Path(p).resolve() for label, p in (s.split("=", 1) for s in args.src)}
    turns: dict[str, list[dict]] = {label: [] for label in srcs}
    for i in range(args.turns):
        for label, src in srcs.items():
            t = turn(src, args.data, args.seeds, args.epochs)
            turns[label].append(t)
            print(f"turn {i + 1} {label}: {t['cpu_seconds']:.1f} s CPU, {t['wall_seconds']:.1f} s wall, load "
                  f"{t['load1_before_after'][0]:.1f}-{t['load1_before_after'][1]:.1f}", flush=True)
    trees = {label: {"src": str(src), "commit": _commit(src), "turns": turns[label],
                     "cpu_seconds_median": statistics.median(t["cpu_seconds"] for t in turns[label]),
                     "cpu_seconds_min": min(t["cpu_seconds"] for t in turns[label])} for label, src in srcs.items()}
    result = {"benchmark": "centralized_cpu_ab", "command": " ".join(sys.argv), "cpus": os.cpu_count(),
              "seeds": args.seeds, "epochs": args.epochs or 200, "threads_per_process": 1, "trees": trees}
    labels = list(trees)
    if len(labels) == 2:
        a, b = (trees[x]["cpu_seconds_median"] for x in labels)
        result["cpu_ratio_first_over_second"] = a / b
        result["same_mcc"] = all(t["mcc_per_seed"] == trees[labels[0]]["turns"][0]["mcc_per_seed"]
                                 for x in labels for t in trees[x]["turns"])
        print(f"{labels[0]} / {labels[1]} median CPU: {a:.1f} / {b:.1f} s = {a / b:.3f}x "
              f"({100 * (1 - b / a):.1f}% less CPU); same MCC per seed: {result['same_mcc']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
