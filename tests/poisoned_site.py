"""A poisoned site, from the test side only: a named site's training returns a corrupted update, to test the
coordinator's defences. Production code has no such hook; this wraps the site's training (SiteRuntime.fit) in the
process that trains: the test process (in-process runs) or a site worker started by tests/poisoned_worker.py."""

from __future__ import annotations

from typing import Mapping

import torch

from magnet_core.model.site import SiteRuntime

MODES = ("nan", "scale")


def corrupt(state: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """"nan": the first attention weight all NaN; "scale": every floating parameter times 1e4."""
    if mode == "nan":
        state = dict(state)
        name = next(k for k in state if k.startswith("attention"))
        state[name] = torch.full_like(state[name], float("nan"))
        return state
    if mode == "scale":
        return {k: v * 1e4 if v.is_floating_point() else v for k, v in state.items()}
    raise ValueError(f"poison mode {mode!r}: one of {MODES}")


def poisoned_fit(sites: Mapping[str, str]):
    """SiteRuntime.fit, corrupting the update of each site named in ``sites`` (site name -> mode)."""
    for mode in sites.values():
        if mode not in MODES:
            raise ValueError(f"poison mode {mode!r}: one of {MODES}")
    honest = SiteRuntime.fit

    def fit(self, *args, **kwargs):
        new, stats = honest(self, *args, **kwargs)
        return (corrupt(new, sites[self.name]) if self.name in sites else new), stats

    return fit


def poison(monkeypatch, sites: Mapping[str, str]) -> None:
    """Poison the named sites for the rest of the test (``monkeypatch``: pytest's MonkeyPatch)."""
    monkeypatch.setattr(SiteRuntime, "fit", poisoned_fit(sites))
