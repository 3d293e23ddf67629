"""Issue 24's study bar: a built-in study with 10 seeds in at most the wall time 5 seeds took when the issue was filed.

Runs one cell of a built-in study twice, one after the other, on this machine: with ``--before-seeds`` (default 5)
in a checkout of the code when the issue was filed (``--before-tree``, e.g. ``git worktree add --detach /tmp/b
914b358`` with its own venv; that code has no ``--workers``: seeds run one by one), then with ``--after-seeds``
(default 10) and ``--workers`` here. Both at ``MAGNET_FL_THREADS=1``. Process wall and CPU times (children), the load
average before and after each, both commits, and the per-seed MCC of the seeds both ran are written to ``--out``.

    python benchmarks/study_seeds_wall.py --before-tree /tmp/before914 --data ../shared/data --study rate \
        --cell rate-0.1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commit(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def _run(tree: Path, python: str, args: list[str]) -> dict:
    env = {**os.environ, "MAGNET_FL_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    before_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run([python, "-m", "simulations.cli", *args], cwd=tree, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    after_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"error: {tree}: magnet-fl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {"tree": str(tree), "commit": _commit(tree), "command": ["magnet-fl", *args], "wall_seconds": wall,
            "cpu_seconds": (after_cpu.ru_utime + after_cpu.ru_stime) - (before_cpu.ru_utime + before_cpu.ru_stime),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def _mcc(out: Path) -> dict[str, float]:
    rows = {}
    for path in out.rglob("*tidy*.csv"):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                if row.get("mcc"):
                    rows[f"{row['method']}/{row['seed']}"] = float(row["mcc"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-tree", type=Path, required=True, help="checkout of the code when the issue was filed")
    ap.add_argument("--before-python", default=None, help="its interpreter (default: <before-tree>/.venv/bin/python)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--study", default="rate")
    ap.add_argument("--cell", default="rate-0.1")
    ap.add_argument("--before-seeds", default="10,20,30,40,50")
    ap.add_argument("--after-seeds", default="10,20,30,40,50,60,70,80,90,100")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_seeds_wall.json")
    args = ap.parse_args()
    before_python = args.before_python or str(args.before_tree / ".venv" / "bin" / "python")
    common = ["study", "--data", str(args.data.resolve()), "--study", args.study, "--cells", args.cell]
    with tempfile.TemporaryDirectory(prefix="study-seeds-") as tmp:
        b_out, a_out = Path(tmp) / "before", Path(tmp) / "after"
        print(f"before: {len(args.before_seeds.split(','))} seeds at {args.before_tree} ...", flush=True)
        before = _run(args.before_tree, before_python, [*common, "--seeds", args.before_seeds, "--out", str(b_out)])
        print(f"  {before['wall_seconds']:.1f} s", flush=True)
        print(f"after: {len(args.after_seeds.split(','))} seeds, --workers {args.workers} ...", flush=True)
        after = _run(ROOT, sys.executable, [*common, "--seeds", args.after_seeds, "--workers", str(args.workers),
                                            "--out", str(a_out)])
        print(f"  {after['wall_seconds']:.1f} s", flush=True)
        before["mcc"], after["mcc"] = _mcc(b_out), _mcc(a_out)
    shared = sorted(set(before["mcc"]) & set(after["mcc"]))
    record = {"benchmark": "study_seeds_wall", "study": args.study, "cell": args.cell, "cpus": os.cpu_count(),
              "threads_per_process": 1, "before": before, "after": after,
              "after_wall_over_before_wall": after["wall_seconds"] / before["wall_seconds"],
              "bar_met": after["wall_seconds"] <= before["wall_seconds"],
              "same_mcc_on_shared_runs": all(before["mcc"][k] == after["mcc"][k] for k in shared),
              "shared_runs": len(shared)}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"after / before wall: {record['after_wall_over_before_wall']:.3f} (bar: <= 1); same MCC on "
          f"{len(shared)} shared runs: {record['same_mcc_on_shared_runs']}; wrote {args.out}")


if __name__ == "__main__":
    main()
