"""What a site releases about its evaluation under the minimum count: the released groups and why others were withheld.

The rules that produce a release are in ``magnet_core.federation.privacy``; this module holds only its form.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class ReleasedHistogram:
    """Score histogram with merged bins: ``edges`` (B + 1,) in [0, 1], ``counts`` (2, B) negatives / positives."""

    edges: np.ndarray
    counts: np.ndarray


@dataclasses.dataclass
class EvalRelease:
    """What a site sends about its evaluation: released groups only, and why the others were withheld."""

    site: str
    k: int
    confusion: dict[str, np.ndarray]
    histogram: dict[str, ReleasedHistogram]
    withheld: dict[str, str]

    def to_dict(self) -> dict:
        """JSON-able form (lists of ints / floats), e.g. for a ConfigRecord entry or a report."""
        return {"site": self.site, "k": self.k, "withheld": dict(self.withheld),
                "confusion": {g: np.asarray(cm).astype(int).tolist() for g, cm in self.confusion.items()},
                "histogram": {g: {"edges": h.edges.tolist(), "counts": np.asarray(h.counts).astype(int).tolist()}
                              for g, h in self.histogram.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "EvalRelease":
        return cls(str(d["site"]), int(d["k"]),
                   {g: np.asarray(cm, dtype=np.int64) for g, cm in d["confusion"].items()},
                   {g: ReleasedHistogram(np.asarray(h["edges"], dtype=np.float64),
                                         np.asarray(h["counts"], dtype=np.int64)) for g, h in d["histogram"].items()},
                   {str(g): str(r) for g, r in d["withheld"].items()})
