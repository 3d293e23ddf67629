"""Patient-graph similarity: the reference's O(N^2) pairwise loop vs magnet_core's matrix form, at N patients."""

from __future__ import annotations

import argparse
import time

import torch

from magnet_core.graph import masked_cosine_similarity
from magnet_core.synthetic import GENERATED_NOTICE, make_generated_cohort


def reference_pairwise(xs: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """A faithful copy of MAGNET's `_compute_adj_mat` loop (cosine on shared-modality features, |.|)."""
    full = torch.cat(xs, dim=1)
    overall = torch.cat([mask[:, m : m + 1].float().repeat(1, x.size(1)) for m, x in enumerate(xs)], dim=1)
    n = full.size(0)
    adj = torch.zeros(n, n)
    for i in range(n):
        for j in range(i, n):
            if i == j:
                continue
            shared = overall[i] * overall[j]
            if shared.sum() > 0:
                a, b = full[i] * shared, full[j] * shared
                sim = torch.dot(a, b) / (torch.norm(a, p=2) * torch.norm(b, p=2) + 1e-8)
                adj[i, j] = adj[j, i] = abs(sim)
    return adj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1000, help="patients (default 1000)")
    args = ap.parse_args()
    cohort = make_generated_cohort(n=args.n, dims={"mRNA": 1000, "miRNA": 448},
                                   missing={"mRNA": 0.4, "miRNA": 0.01}, seed=0)
    print(f"{GENERATED_NOTICE}: {args.n} patients, mRNA 1000 + miRNA 448 features, OV-like missingness")
    xs = [torch.from_numpy(cohort.X[m]) for m in cohort.modalities]
    mask = torch.from_numpy(cohort.mask)
    t0 = time.perf_counter()
    ours = masked_cosine_similarity(xs, mask)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_pairwise(xs, mask)
    t_ref = time.perf_counter() - t0
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    print(f"reference pairwise loop: {t_ref:.2f} s")
    print(f"magnet_core matrix form: {t_ours * 1000:.1f} ms (identical similarities, max |diff| "
          f"{float((ours - ref).abs().max()):.1e})")
    print(f"{t_ref / t_ours:.0f}x")


if __name__ == "__main__":
    main()
