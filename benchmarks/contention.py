"""The 5-seed OV centralized job alone and beside a competing 2-thread CPU job: both wall times and their ratio
(bar <= 1.5x), with the machine's load average during each run; writes benchmarks/results/contention.json."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMPETITOR = """
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def _default_data() -> str:
    root = os.environ.get("MAGNET_FL_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    return str(Path(root) / "tcga-ov-magnet")


def timed_run(cmd: list[str], env: dict[str, str]) -> dict:
    """Wall time of ``cmd`` and the 1-minute load average sampled every second while it runs."""
    loads: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            loads.append(os.getloadavg()[0])
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return {"wall_s": wall, "load1_mean": statistics.mean(loads), "load1_max": max(loads)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=_default_data(), help="the tcga-ov-magnet folder")
    ap.add_argument("--seeds", default="10,20,30,40,50")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per seed (default: the preset's 200)")
    ap.add_argument("--out", default=str(RESULTS / "contention.json"))
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"error: {args.data}: no such directory (pass --data or set MAGNET_FL_DATA)")
    # The job runs as users run it: the magnet-fl command with its own thread policy (no OMP_* variables set).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as tmp:
        job = [sys.executable, "-m", "simulations.cli", "centralized", "--data", args.data, "--preset", "ov",
               "--seeds", args.seeds] + (["--epochs", str(args.epochs)] if args.epochs else [])
        print(f"job: magnet-fl {' '.join(job[3:])}", flush=True)
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        alone = timed_run(job + ["--out", str(Path(tmp) / "alone")], env)
        print(f"alone: {alone['wall_s']:.1f} s (load {alone['load1_mean']:.1f} mean, {alone['load1_max']:.1f} max)",
              flush=True)
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)  # a 2-thread torch job
        try:
            time.sleep(2.0)
            beside = timed_run(job + ["--out", str(Path(tmp) / "beside")], env)
        finally:
            competitor.terminate()
            competitor.wait()
    ratio = beside["wall_s"] / alone["wall_s"]
    print(f"beside a 2-thread CPU job: {beside['wall_s']:.1f} s (load {beside['load1_mean']:.1f} mean, "
          f"{beside['load1_max']:.1f} max)")
    print(f"ratio {ratio:.2f}x (bar <= 1.5x); this machine is shared, so treat the numbers as indicative")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "contention", "command": " ".join(sys.argv),
                                          "job": job[3:], "alone": alone, "beside_2_thread_job": beside,
                                          "ratio": ratio, "cpus": os.cpu_count()}, indent=1))
    print(f"{ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
