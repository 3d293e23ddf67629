"""A generated multi-omics cohort (shared class signal, modality noise, realistic missingness)."""

from __future__ import annotations

import numpy as np

from magnet_core.cohort.data import Cohort, stratified_split

GENERATED_NOTICE = "GENERATED cohort (synthetic data, not real patients)"

# Named settings of make_generated_cohort (data path "generated:<variant>[:<patients>]"; "" and "generated:<N>" are
# "default"). "default": a strong class signal that every method learns (it shows the workflow, not a difference).
# "demo": the first run's cohort (`magnet-fl simulate` without --data, scenario demo-6: 6 sites of about 60
# patients): a weaker signal, so one site's ~42 training patients learn it less well than the consortium's ~250.
# Chosen on seeds 1, 2 and 3 only (benchmarks/demo_tuning.py, benchmarks/results/demo_tuning.json): signal 0.3 /
# 0.45 / 0.6 / 0.8 gave federated - local-only (consortium test patients) mean +0.071 / +0.113 / +0.176 / +0.150
# and federated - centralized -0.048 / -0.079 / -0.042 / -0.035 MCC; 0.6 has the largest gain over local-only.
# Class centres at a fixed distance (equal_separation, signal 0.6; and 3 classes at 0.8) were tried on the same
# seeds and gave a smaller gain on the sites' own test patients (+0.048 and +0.012), so they are not used.
# The README reports seeds 10, 20 and 30 (benchmarks/results/demo.json).
GENERATED_VARIANTS: dict[str, dict] = {
    "default": {},
    "demo": {"n": 360, "signal": 0.6},
}


def generated_cohort(variant: str = "default", n: int | None = None, seed: int = 0) -> Cohort:
    """The cohort of a named variant (GENERATED_VARIANTS), with ``n`` patients instead of the variant's own."""
    if variant not in GENERATED_VARIANTS:
        raise ValueError(f"unknown generated cohort {variant!r}; choose one of {sorted(GENERATED_VARIANTS)}")
    settings = dict(GENERATED_VARIANTS[variant])
    if n is not None:
        settings["n"] = n
    return make_generated_cohort(**settings, seed=seed)


def make_generated_cohort(
    n: int = 300,
    dims: dict[str, int] | None = None,
    num_classes: int = 2,
    missing: dict[str, float] | None = None,
    signal: float = 1.0,
    seed: int = 0,
    equal_separation: bool = False,
) -> Cohort:
    """Patients share a latent class signal seen through each modality with its own noise and loading.

    ``missing[m]`` is the fraction of patients lacking modality m; every patient keeps at least one modality.
    Values are squashed to [0, 1] like min-max scaled omics. The class centres are random normal draws (so how far
    apart they lie, hence how hard the task is, changes with the seed), or with ``equal_separation`` the corners
    of a randomly rotated regular simplex at the draws' expected distance: every seed then poses a task of the same
    difficulty and only the patients and the noise change.
    """
    dims = dims or {"mRNA": 200, "miRNA": 100, "DNA": 150}
    missing = missing if missing is not None else {"mRNA": 0.3, "miRNA": 0.05, "DNA": 0.4}
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    labels[:num_classes] = np.arange(num_classes)  # every class present
    latent_dim = 8
    centers = rng.normal(0, 1, size=(num_classes, latent_dim))
    if equal_separation:
        centers = simplex_centers(num_classes, latent_dim, rng)
    z = centers[labels] * signal + rng.normal(0, 1.0, size=(n, latent_dim))
    modalities = list(dims)
    X, mask = {}, np.ones((n, len(modalities)), dtype=bool)
    for j, m in enumerate(modalities):
        load = rng.normal(0, 1, size=(latent_dim, dims[m])) / np.sqrt(latent_dim)
        raw = z @ load + rng.normal(0, 1.5, size=(n, dims[m]))
        X[m] = (1.0 / (1.0 + np.exp(-raw))).astype(np.float32)
        mask[:, j] = rng.random(n) >= missing.get(m, 0.0)
    empty = ~mask.any(axis=1)
    mask[empty, rng.integers(0, len(modalities), size=int(empty.sum()))] = True
    for j, m in enumerate(modalities):
        X[m][~mask[:, j]] = 0.0
    cohort = Cohort(
        sample_ids=np.array([f"GEN-{i:05d}" for i in range(n)]),
        labels=labels.astype(np.int64),
        modalities=modalities,
        features={m: [f"{m}_{k}" for k in range(d)] for m, d in dims.items()},
        X=X,
        mask=mask,
        num_classes=num_classes,
        name="generated",
        generated=True,
    )
    return stratified_split(cohort, seed)


def simplex_centers(num_classes: int, latent_dim: int, rng: np.random.Generator) -> np.ndarray:
    """``num_classes`` points of a randomly rotated regular simplex in ``latent_dim`` dimensions, every pair at
    distance sqrt(2 * latent_dim) (the root mean square distance of two standard normal draws)."""
    if num_classes > latent_dim:
        raise ValueError(f"equal_separation needs num_classes <= {latent_dim}, got {num_classes}")
    corners = np.eye(num_classes) - 1.0 / num_classes  # pairwise distance sqrt(2)
    basis, _ = np.linalg.qr(rng.normal(0, 1, size=(latent_dim, num_classes)))  # orthonormal columns
    return corners @ basis.T * np.sqrt(latent_dim)
