"""Secure evaluation: the sites' evaluation counts summed through secure aggregation, the minimum count k applied to
the consortium's sums.

Each site encodes its evaluation counts (magnet_core.model.metrics.EvalCounts) as one fixed-layout vector of whole
numbers (:class:`EvalLayout`): per group (all / paired / unpaired) the C x C confusion matrix, then, for a binary
task, per group the (2, B) score histogram on the B equal log-odds bins the site's plain release would start from.
The vector travels only masked, through the same secure-aggregation protocol as the training updates
(magnet_core.federation.secagg, ``frac_bits = 1``: a count c is carried as 2c, so the sum is exact as long as it
stays below 2^61 / sites; the decoded sum is checked to be whole and non-negative). The coordinator learns the sum
only, and applies the rules of magnet_core.federation.privacy (``release_eval``) to the SUM (:func:`release_sums`):
a group is pooled only when the consortium holds >= k test patients in it (complementary suppression of the
subgroups as for a site), and the summed histogram's bins are merged until each holds >= k patients. So sites with
fewer than k test patients, even a single one, contribute, and many small sites give the exact pooled MCC,
accuracy and F1 (those of the pooled predictions) and the AUROC interval, where the per-site rule withholds them all.

Per-site metrics under secure evaluation (the subtraction leak): a site's clear release next to a secure sum it is
part of lets the coordinator subtract it. The rule implemented here is the simple one: in a secure-evaluation round
a site releases NO per-site metric at all, whatever its size (:func:`refuse_clear_release`; the site enforces it,
its reply carries only masked counts). Releasing a per-site metric when the site holds >= k and the remainder still
holds >= k patients of >= 2 sites is not implemented.

What the coordinator's view holds (a site's masked vector, the unmask shares, the sum): a site's masked vector is
its counts plus a self mask and pairwise masks, each a PRG stream from a seed the coordinator does not hold; after
unmasking it holds the survivors' self-mask seeds (never a survivor's pairwise key), so a survivor's vector minus
its self mask is still padded by pairwise masks, uniform in Z_2^64 whatever the counts. Only the sum says anything,
and it is released only for groups of >= k patients.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np

from magnet_core.model.metrics import DEFAULT_BINS, EvalCounts
from magnet_core.protocol.release import EvalRelease
from magnet_core.protocol.secagg import SecAggError, SecAggSetup

from .privacy import DEFAULT_MAX_BINS, pool_releases, release_eval
from .secagg import SecAggServer, run_local

GROUPS = ("all", "paired", "unpaired")
EVAL_FRAC_BITS = 1  # counts are whole numbers: c -> 2c in Z_2^64, exact
SUM_SITE = "secure sum"  # the site name of the summed counts (a release of the consortium, not of one site)


def layout_bins(source_bins: int = DEFAULT_BINS, max_bins: int = DEFAULT_MAX_BINS) -> int:
    """The bins a site's histogram is coarsened to before it is summed: the largest even divisor of
    ``source_bins`` that is <= ``max_bins`` (the grid ``privacy.coarsen_histogram`` starts a plain release from)."""
    if source_bins % 2 or source_bins < 2:
        raise ValueError(f"a score histogram needs an even number of bins, got {source_bins}")
    return max(d for d in range(2, min(source_bins, max(max_bins, 2)) + 1, 2) if source_bins % d == 0)


@dataclasses.dataclass(frozen=True)
class EvalLayout:
    """What one secure sum of evaluation counts carries: per group the (C, C) confusion matrix (rows true class),
    then for a binary task per group the (2, bins) score histogram (row 0 negatives, row 1 positives)."""

    num_classes: int
    bins: int  # 0: no histograms (multi-class)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"an evaluation layout needs >= 2 classes, got {self.num_classes}")
        if self.bins and (self.num_classes != 2 or self.bins % 2):
            raise ValueError(f"score histograms are for binary tasks with an even number of bins, got "
                             f"{self.num_classes} classes and {self.bins} bins")

    @classmethod
    def for_task(cls, num_classes: int, max_bins: int = DEFAULT_MAX_BINS, source_bins: int = DEFAULT_BINS
                 ) -> "EvalLayout":
        return cls(int(num_classes), layout_bins(source_bins, max_bins) if num_classes == 2 else 0)

    @property
    def length(self) -> int:
        c = self.num_classes
        return len(GROUPS) * (c * c + 2 * self.bins)

    def encode(self, counts: EvalCounts) -> np.ndarray:
        """A site's counts as a vector of whole numbers (float64, for SecAggSite.mask). A missing group is zeros;
        a histogram is coarsened to the layout's bins (its bin count must be a multiple of them)."""
        c, out, pos = self.num_classes, np.zeros(self.length, dtype=np.float64), 0
        for g in GROUPS:
            cm = np.asarray(counts.confusion.get(g, np.zeros((c, c))), dtype=np.int64)
            if cm.shape != (c, c):
                raise ValueError(f"site {counts.site!r}: confusion matrix {g!r} has shape {cm.shape}, the layout "
                                 f"expects ({c}, {c})")
            out[pos:pos + c * c] = cm.ravel()
            pos += c * c
        if self.bins:
            for g in GROUPS:
                h = np.asarray(counts.histogram.get(g, np.zeros((2, self.bins))), dtype=np.int64)
                if h.ndim != 2 or h.shape[0] != 2 or h.shape[1] % self.bins:
                    raise ValueError(f"site {counts.site!r}: histogram {g!r} has shape {h.shape}, the layout "
                                     f"expects (2, a multiple of {self.bins})")
                out[pos:pos + 2 * self.bins] = h.reshape(2, self.bins, -1).sum(axis=2).ravel()
                pos += 2 * self.bins
        if (out < 0).any():
            raise ValueError(f"site {counts.site!r}: negative counts")
        return out

    def decode(self, total: np.ndarray, site: str = SUM_SITE) -> EvalCounts:
        """The summed vector as EvalCounts (whole, non-negative numbers, else SecAggError naming the position)."""
        total = np.asarray(total, dtype=np.float64).ravel()
        if total.shape != (self.length,):
            raise SecAggError(f"summed evaluation of length {total.shape[0]}, the layout expects {self.length}")
        whole = np.round(total)
        bad = (np.abs(total - whole) > 1e-6) | (whole < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SecAggError(f"summed evaluation count {total[i]!r} at position {i} is not a whole number >= 0")
        v = whole.astype(np.int64)
        c, pos = self.num_classes, 0
        confusion, histogram = {}, {}
        for g in GROUPS:
            confusion[g] = v[pos:pos + c * c].reshape(c, c)
            pos += c * c
        if self.bins:
            for g in GROUPS:
                histogram[g] = v[pos:pos + 2 * self.bins].reshape(2, self.bins)
                pos += 2 * self.bins
        sums = {g: int(confusion[g].sum()) for g in GROUPS}
        if sums["all"] != sums["paired"] + sums["unpaired"]:
            raise SecAggError(f"summed evaluation: {sums['all']} test patients in all, but {sums['paired']} paired "
                              f"+ {sums['unpaired']} unpaired")
        for g, h in histogram.items():
            if int(h.sum()) != sums[g]:
                raise SecAggError(f"summed evaluation: histogram {g!r} holds {int(h.sum())} patients, its confusion "
                                  f"matrix {sums[g]}")
        return EvalCounts(site, confusion, histogram)

    def to_record(self) -> dict:
        return {"num-classes": self.num_classes, "bins": self.bins}

    @classmethod
    def from_record(cls, r: Mapping) -> "EvalLayout":
        return cls(int(r["num-classes"]), int(r["bins"]))


def release_sums(summed: EvalCounts, k: int, max_bins: int = DEFAULT_MAX_BINS) -> EvalRelease:
    """The minimum-count rule on the consortium's sums: a group only with >= k test patients in the sum (and the
    subgroups' complementary suppression), the summed histogram's bins merged to >= k patients each."""
    return release_eval(summed, k, max_bins)


def pool_sum(total: np.ndarray, layout: EvalLayout, k: int, sites: Sequence[str] = (),
             max_bins: int = DEFAULT_MAX_BINS) -> dict:
    """What the coordinator publishes from a decoded secure sum: pooled metrics per group (keys as
    ``privacy.pool_releases``), the groups withheld from the SUM and why, test patients per group in the sum, and
    the sites in the sum. No per-site entry: under secure evaluation no site's own metric exists."""
    summed = layout.decode(total)
    release = release_sums(summed, k, max_bins)
    pooled = pool_releases([release])
    return {"metrics": pooled["metrics"], "withheld": dict(release.withheld),
            "patients": {g: int(np.asarray(release.confusion[g]).sum()) for g in release.confusion},
            "sites": list(sites), "k": k}


def refuse_clear_release(secure_evaluation: bool) -> None:
    """A site's own rule: in a secure-evaluation round it releases no per-site metric (its reply carries only
    masked counts), since a clear release next to the secure sum would let the coordinator subtract it."""
    if secure_evaluation:
        raise SecAggError("this is a secure-evaluation round: this site releases no per-site evaluation (its counts "
                          "go only masked into the secure sum; a clear release next to the sum could be subtracted)")


def secure_pool_local(per_site: Sequence[EvalCounts], k: int, max_bins: int = DEFAULT_MAX_BINS,
                      round_id: str = "secure-evaluation", max_dropouts: int = 0,
                      drop_before_mask: Iterable[int] = (), drop_after_mask: Iterable[int] = ()
                      ) -> tuple[dict, SecAggServer]:
    """Every stage in one process (simulation, tests): the sites' counts, encoded and summed by secure aggregation
    (sites are secagg ids 1..n in ``per_site`` order), then :func:`pool_sum`. With one site there is no secure sum:
    its counts are pooled only under the plain rule (ValueError here)."""
    if len(per_site) < 2:
        raise ValueError(f"secure evaluation needs at least 2 sites, got {len(per_site)}")
    c = int(next(iter(per_site[0].confusion.values())).shape[0])
    source = int(next(iter(per_site[0].histogram.values())).shape[1]) if per_site[0].histogram else DEFAULT_BINS
    layout = EvalLayout.for_task(c, max_bins, source)
    ids = list(range(1, len(per_site) + 1))
    setup = SecAggSetup.for_sites(round_id, ids, layout.length, max_dropouts, EVAL_FRAC_BITS)
    vectors = {i: layout.encode(s) for i, s in zip(ids, per_site)}
    total, server = run_local(setup, vectors, drop_before_mask, drop_after_mask)
    names = {i: s.site for i, s in zip(ids, per_site)}
    return pool_sum(total, layout, k, [names[i] for i in server.u3], max_bins), server
