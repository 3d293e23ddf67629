"""The 5-seed centralized OV run (the paper's protocol): wall time, peak memory and speed-up vs the reference."""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from magnet_core.config import get_preset
from simulations.centralized import run_centralized

REFERENCE_SECONDS = 215.0  # MAGNET reference code, 5 seeds x ~43 s, measured on this machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=os.path.join(os.environ.get("MAGNET_FL_DATA", "../shared/data"),
                                                   "tcga-ov-magnet"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        res = run_centralized(Path(args.data), [10, 20, 30, 40, 50], get_preset("ov"), Path(out))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mcc = res["metrics"]["mcc"]
    print(f"test MCC {mcc['mean']:.3f} ± {mcc['std']:.3f} (reference code: 0.240 ± 0.123)")
    print(f"wall {wall:.1f} s for 5 seeds ({wall / 5:.1f} s per seed), peak RSS {peak:.2f} GiB")
    print(f"reference: {REFERENCE_SECONDS:.0f} s")
    print(f"{REFERENCE_SECONDS / wall:.1f}x")


if __name__ == "__main__":
    main()
