"""The 5-seed centralized OV run (the paper's protocol): wall time, time per seed, peak RSS, speed-up vs reference."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from magnet_core.config import get_preset
from simulations.centralized import run_centralized

REFERENCE_SECONDS = 215.0  # MAGNET reference code on these files: 5 seeds x ~43 s, measured on this machine
SEEDS = [10, 20, 30, 40, 50]


def _default_data() -> str:
    root = os.environ.get("MAGNET_FL_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    return str(Path(root) / "tcga-ov-magnet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=_default_data(),
                    help="the tcga-ov-magnet folder (default: $MAGNET_FL_DATA/tcga-ov-magnet)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own choice)")
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"error: {data}: no such directory (pass --data or set MAGNET_FL_DATA)")
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        res = run_centralized(data, SEEDS, get_preset("ov"), Path(out))
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    mcc = res["metrics"]["mcc"]
    print(f"test MCC {mcc['mean']:.3f} ± {mcc['std']:.3f} per seed "
          + " ".join(f"{v:.3f}" for v in mcc["per_seed"]) + " (reference code: 0.240 ± 0.123)")
    print(f"wall {wall:.1f} s for {len(SEEDS)} seeds x 200 epochs ({wall / len(SEEDS):.1f} s per seed), "
          f"{torch.get_num_threads()} torch thread(s), peak RSS {peak_gib:.2f} GiB")
    print(f"reference code: {REFERENCE_SECONDS:.0f} s (~43 s per seed, peak 0.7 GB); "
          f"speed-up {REFERENCE_SECONDS / wall:.2f}x")
    print(f"{REFERENCE_SECONDS / wall:.0f}x")


if __name__ == "__main__":
    main()
