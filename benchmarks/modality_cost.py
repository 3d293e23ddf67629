"""Training cost per epoch vs number of modalities (the paper's linear-scaling claim), on a generated cohort."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from magnet_core.cohort.generated import GENERATED_NOTICE, make_generated_cohort
from magnet_core.model.config import get_preset
from magnet_core.model.network import build_model
from magnet_core.model.train import PatientSet, train_epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--features", type=int, default=500, help="features per modality")
    ap.add_argument("--max-modalities", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)  # steadier timings
    preset = get_preset("ov")
    print(f"{GENERATED_NOTICE}: {args.patients} patients, {args.features} features per modality, 30% missing each")
    rows = []
    for m in range(1, args.max_modalities + 1):
        dims = {f"omics{k}": args.features for k in range(m)}
        cohort = make_generated_cohort(n=args.patients, dims=dims, missing={k: 0.3 for k in dims}, seed=0)
        data = PatientSet.from_cohort(cohort, preset.graph.sparsity)
        model = build_model(dims, 2, preset.model, 0)
        train_epochs(model, data, preset.train, 3)  # warm-up
        t0 = time.perf_counter()
        train_epochs(model, data, preset.train, args.epochs)
        per_epoch = (time.perf_counter() - t0) / args.epochs * 1000
        rows.append((m, per_epoch))
        print(f"{m} modalities: {per_epoch:.1f} ms per epoch")
    x, y = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    slope, intercept = np.polyfit(x, y, 1)
    r2 = 1 - ((y - (slope * x + intercept)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    print(f"linear fit: {intercept:.1f} ms + {slope:.1f} ms per modality (R^2 = {r2:.3f})")


if __name__ == "__main__":
    main()
