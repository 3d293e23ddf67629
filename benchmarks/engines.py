"""Wall time and peak memory of a federated run with Flower's simulation engine vs the in-process engine.

``--engine both --reps N`` runs the two engines N times each, alternating, every run in a fresh Python process
(imports, Ray's start-up and teardown included, as a user's run pays them), and prints both medians and their
ratio; the results go to benchmarks/results/engines.json."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from server.config import FederatedConfig
from simulations.engine import run_flower, run_inprocess


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants (Ray starts several), in bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def compare(args: argparse.Namespace) -> None:
    """Alternate fresh-process runs of both engines; print medians and the ratio; write the JSON."""
    walls: dict[str, list[float]] = {"inprocess": [], "flower": []}
    process_walls: dict[str, list[float]] = {"inprocess": [], "flower": []}
    finals: dict[str, list[float]] = {"inprocess": [], "flower": []}
    loads = []
    for rep in range(args.reps):
        for engine in ("inprocess", "flower"):
            out = tempfile.mkdtemp(prefix=f"bench-engines-{engine}-")
            try:
                cmd = [sys.executable, __file__, "--engine", engine, "--data", args.data, "--sites", str(args.sites),
                       "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--out", out,
                       "--json"]
                t0 = time.perf_counter()
                # output to files, not pipes: Ray's daemons inherit the child's descriptors
                with open(os.path.join(out, "stdout"), "w") as so, open(os.path.join(out, "stderr"), "w") as se:
                    code = subprocess.run(cmd, stdout=so, stderr=se, check=False).returncode
                process_wall = time.perf_counter() - t0
                if code != 0:
                    sys.exit(f"error: {engine} run failed:\n{Path(out, 'stderr').read_text()[-3000:]}")
                result = json.loads(Path(out, "stdout").read_text().strip().splitlines()[-1])
            finally:
                shutil.rmtree(out, ignore_errors=True)
            walls[engine].append(result["wall"])
            process_walls[engine].append(process_wall)
            finals[engine].append(result["final_mcc"])
            loads.append(os.getloadavg()[0])
            print(f"rep {rep + 1}/{args.reps} {engine:>9}: run {result['wall']:.1f} s (process {process_wall:.1f} s), "
                  f"final MCC {result['final_mcc']:.3f}, load {loads[-1]:.1f}", flush=True)
    med = {e: statistics.median(v) for e, v in walls.items()}
    pmed = {e: statistics.median(v) for e, v in process_walls.items()}
    ratios = [f / i for f, i in zip(walls["flower"], walls["inprocess"])]
    print(f"median run wall: in-process {med['inprocess']:.1f} s, Flower {med['flower']:.1f} s; ratio of medians "
          f"{med['flower'] / med['inprocess']:.2f}x (per-rep ratios {min(ratios):.2f}-{max(ratios):.2f}x)")
    print(f"median process wall (Python start and imports included): in-process {pmed['inprocess']:.1f} s, "
          f"Flower {pmed['flower']:.1f} s; ratio {pmed['flower'] / pmed['inprocess']:.2f}x")
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "engines", "command": " ".join(sys.argv), "sites": args.sites,
                               "rounds": args.rounds, "local_epochs": args.local_epochs, "walls": walls,
                               "final_mcc": finals, "median": med, "ratio_of_medians": med["flower"] / med["inprocess"],
                               "process_walls": process_walls, "process_median": pmed,
                               "process_ratio_of_medians": pmed["flower"] / pmed["inprocess"],
                               "per_rep_ratios": ratios, "load_average_1min": loads}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--engine", choices=("flower", "inprocess", "both"), required=True)
    ap.add_argument("--reps", type=int, default=5, help="with --engine both: runs per engine")
    ap.add_argument("--json", action="store_true", help="print one JSON line of results (used by --engine both)")
    ap.add_argument("--json-out", default=str(Path(__file__).resolve().parent / "results" / "engines.json"))
    ap.add_argument("--data", default=os.environ.get("MAGNET_FL_DATA", "../shared/data") + "/tcga-ov-magnet")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--out", default="runs/bench-engines")
    args = ap.parse_args()
    if args.engine == "both":
        return compare(args)
    scenario = {2: "iid-2", 3: "iid-3", 5: "iid-5"}[args.sites]
    cfg = FederatedConfig(num_server_rounds=args.rounds, local_epochs=args.local_epochs, data_path=args.data,
                          scenario=scenario, seed=10, min_sites=args.sites,
                          out_dir=os.path.join(args.out, args.engine))
    me, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(me))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    runner = run_inprocess if args.engine == "inprocess" else run_flower
    _, history = runner(cfg, args.sites)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    rounds = [r["seconds"] for r in history]
    if args.json:
        print(json.dumps({"engine": args.engine, "wall": wall, "final_mcc": history[-1]["global"]["mcc"],
                          "round_median": statistics.median(rounds), "first_round": rounds[0], "peak_rss": peak[0]}))
        return
    print(f"engine={args.engine} sites={args.sites} rounds={args.rounds} local_epochs={args.local_epochs}")
    print(f"final global MCC {history[-1]['global']['mcc']:.3f}")
    print(f"wall {wall:.1f} s; per round median {sorted(rounds)[len(rounds) // 2]:.2f} s, first {rounds[0]:.2f} s")
    print(f"peak RSS (process tree) {peak[0] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
