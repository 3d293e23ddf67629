"""Wall time and peak memory of a federated run with Flower's simulation engine vs the in-process engine."""

from __future__ import annotations

import argparse
import os
import threading
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--engine", choices=("flower", "inprocess"), required=True)
    ap.add_argument("--data", default=os.environ.get("MAGNET_FL_DATA", "../shared/data") + "/tcga-ov-magnet")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--out", default="runs/bench-engines")
    args = ap.parse_args()
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
    print(f"engine={args.engine} sites={args.sites} rounds={args.rounds} local_epochs={args.local_epochs}")
    print(f"final global MCC {history[-1]['global']['mcc']:.3f}")
    print(f"wall {wall:.1f} s; per round median {sorted(rounds)[len(rounds) // 2]:.2f} s, first {rounds[0]:.2f} s")
    print(f"peak RSS (process tree) {peak[0] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
