"""How simulate pools a method's test evaluation, and over how many sites, models and patients.

Two evaluations of every method (issue 23 item 3, issue 25 item 4):

* **own sites' test patients** (keys without prefix): each site scores its own test patients with the model it
  would deploy (local-only and personalized: its own model; the other methods: the one global model), and the
  confusion matrices released under the minimum count k are summed. For local-only this rewards a model that has
  learned which site a patient comes from (its own site's label mix and missingness), not the disease.
* **consortium test patients** (prefix ``consortium_``): every model of the method scores every site's test
  patients, and the releases of all (model, site) pairs are summed, so each per-site model is judged on the whole
  test population. For a method with one global model the pairs are the same as above. Scoring a site's model on
  another site's patients is a simulation-only measurement (a deployment would have to ship the model there).

Each evaluation records, per group (all / paired / unpaired test patients), how many test sites released it
(``sites``), how many distinct test patients those sites hold in the group (``patients``), how many models were
scored (``models``) and how many (model, site) evaluations were summed (``pairs``): a group below k at a site is
withheld, so groups can be pooled over different sites.

Under secure evaluation (run config ``secure-evaluation = true``, issue 25 item 1) both evaluations are pooled
as the coordinator pools a federated method's: each site adds up its own counts (over the models scored on its
test patients), the sites' sums are summed by secure aggregation (:func:`secure_pooled`) and k is applied to the
consortium's sum, so sites with fewer than k test patients contribute and no per-site release exists.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from magnet_core.federation.privacy import EvalRelease, pool_releases
from magnet_core.federation.secure_eval import secure_pool_local
from magnet_core.model.metrics import EvalCounts

CONSORTIUM = "consortium_"
EVALUATIONS = {"": "own sites' test patients", CONSORTIUM: "consortium test patients"}
GROUPS = ("all", "paired", "unpaired")
COVERAGE = ("sites", "patients", "models", "pairs")


def group_prefix(group: str) -> str:
    return "" if group == "all" else f"{group}_"


def coverage(evaluations: Sequence[tuple[str, EvalRelease]], prefix: str = "") -> dict[str, int]:
    """Per group: test sites that released it, their distinct test patients in it and the models scored on it.
    ``evaluations`` are (model name, a site's release of that model's evaluation) pairs."""
    out: dict[str, int] = {}
    for g in GROUPS:
        have = [(model, r) for model, r in evaluations if g in r.confusion]
        sizes = {r.site: int(np.asarray(r.confusion[g]).sum()) for _, r in have}
        key = f"{prefix}{group_prefix(g)}"
        out.update({f"{key}sites": len(sizes), f"{key}patients": sum(sizes.values()),
                    f"{key}models": len({model for model, _ in have}), f"{key}pairs": len(have)})
    return out


def pooled(evaluations: Sequence[tuple[str, EvalRelease]], prefix: str = "") -> dict[str, float | int | None]:
    """Metrics of the summed releases (exactly those of the pooled predictions; AUROC as an interval) and their
    coverage, every key prefixed with ``prefix``."""
    metrics = pool_releases([r for _, r in evaluations])["metrics"]
    return {**{f"{prefix}{k}": v for k, v in metrics.items()}, **coverage(evaluations, prefix)}


def pooled_as_released(metrics: dict, evaluations: Sequence[tuple[str, EvalRelease]], pooled_sites: Iterable[str],
                       withheld: dict[str, list[str]]) -> dict[str, float | int | None]:
    """A federated run's own-sites evaluation: the coordinator's pooled ``metrics`` and their coverage, read from
    which sites it pooled and which groups each withheld (``evaluations`` give the group sizes of each site)."""
    keep = set(pooled_sites)
    sizes = {r.site: r for _, r in evaluations}
    out: dict[str, float | int | None] = dict(metrics)
    for g in GROUPS:
        sites = [s for s in keep if s in sizes and g not in (withheld.get(s) or [])]
        key = group_prefix(g)
        out.update({f"{key}sites": len(sites),
                    f"{key}patients": sum(int(np.asarray(sizes[s].confusion[g]).sum()) for s in sites
                                          if g in sizes[s].confusion),
                    f"{key}models": 1 if sites else 0, f"{key}pairs": len(sites)})
    return out


def add_counts(site: str, parts: Sequence[EvalCounts]) -> EvalCounts:
    """One site's evaluation counts over several models, added up (what the site itself sums before masking)."""
    groups = dict.fromkeys(g for c in parts for g in c.confusion)
    hgroups = dict.fromkeys(g for c in parts for g in c.histogram)
    return EvalCounts(site, {g: sum(np.asarray(c.confusion[g], dtype=np.int64) for c in parts if g in c.confusion)
                             for g in groups},
                      {g: sum(np.asarray(c.histogram[g], dtype=np.int64) for c in parts if g in c.histogram)
                       for g in hgroups})


def secure_pooled(evaluations: Sequence[tuple[str, EvalCounts]], k: int, max_bins: int, prefix: str = ""
                  ) -> dict[str, float | int | None]:
    """Metrics of a secure evaluation: ``evaluations`` are (model name, a site's counts of that model on its test
    patients); each site adds its own counts up, the sites' sums go through secure aggregation
    (``secure_pool_local``: every protocol stage in this process) and k is applied to the consortium's sum.
    Coverage per group pooled: the sites in the sum holding patients in it, their distinct test patients, the
    models scored and the (model, site) pairs summed; 0 for a group withheld from the sum."""
    by_site: dict[str, list[tuple[str, EvalCounts]]] = {}
    for model, c in evaluations:
        by_site.setdefault(c.site, []).append((model, c))
    sums = [add_counts(site, [c for _, c in pairs]) for site, pairs in by_site.items()]
    out, _ = secure_pool_local(sums, k, max_bins)
    result: dict[str, float | int | None] = {f"{prefix}{key}": v for key, v in out["metrics"].items()}
    for g in GROUPS:
        key = f"{prefix}{group_prefix(g)}"
        n = {site: int(np.asarray(pairs[0][1].confusion.get(g, 0)).sum()) for site, pairs in by_site.items()}
        have = [site for site in by_site if n[site]] if g in out["patients"] else []
        result.update({f"{key}sites": len(have), f"{key}patients": sum(n[s] for s in have),
                       f"{key}models": len({m for s in have for m, _ in by_site[s]}),
                       f"{key}pairs": sum(len(by_site[s]) for s in have)})
    return result
