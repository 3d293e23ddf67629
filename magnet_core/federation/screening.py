"""The coordinator's per-site screen of training updates: which steps to reject, and the norm every accepted step is
clipped to before weighting (bounded influence). Pure functions; the strategy applies the decisions.

Bounded influence, not reject-on-disagreement: a step is rejected only when it is out of band (its own norm
against the global model's) or when it is both **opposed** (it points away from strictly more than half of the
sites) and **large** (more than ``peer_ratio`` x the upper median norm of this round's and past rounds' steps).
Every other step, whatever its direction, is kept and clipped to ``clip_factor`` x the lower median norm of this
round's accepted steps and past rounds' accepted (clipped) steps, then weighted by its enrolled share. So no site
moves the model further than its share x that bound; up to half of the sites can neither lift the bound above the
others' norms nor make an honest step look large; and a minority can neither veto a majority nor get honest steps
that point elsewhere (label skew) rejected: "opposed" needs strictly more than half of the votes.

Two modes:

* **Peer-referenced** (no DP): as above; the bound and the opposed-and-large rule look at the other sites.
* **Independent** (DP on, ``dp_clip`` = the public clipping norm C): a site's decision uses only its own step, the
  global model and C; never another site's step, nor past rounds' per-site norms. Then adding, removing or changing
  one site changes no other site's accept / clip decision, and the sum's sensitivity C that the accountant assumes
  holds. Influence is bounded by C itself.

Gradients (``local-update = "gradient"``, fedsgd) get their own screen, :func:`screen_gradients`: a site's update is
then minus its full-batch gradient, not a move of the model, so its length says nothing against the model's norm.
Under label skew the step screen, calibrated on local-Adam steps, rejected and shortened honest gradients
(``benchmarks/screening_record.py``; why is not tested). The gradient screen rejects only a missing gradient (norm 0
or below ``min_to_global`` x the model's norm), nothing for being long or for its direction, and clips each gradient
to ``gradient_clip_factor`` x the lower median of this round's gradient norms only (past rounds' norms, larger early
in training, would set this round's bound). The bound is the step screen's influence bound: one site moves the mean
gradient by at most its share x the lower median norm, in any direction, so it can turn the coordinator's step where
the honest sites' mean gradient is shorter than that (their gradients pointing apart); a larger factor keeps more of
long honest gradients and gives such a site more (``tests/test_adversarial.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from magnet_core.model.network import MAGNET

Params = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ScreenRules:
    """Bounds on one site's update, checked by the coordinator without trusting any site.

    Measured on tcga-ov-magnet and tcga-brca-rjive (3 sites, 10 local epochs): honest updates move the model by
    1.5-3% of its norm, their pairwise cosines are 0.2-0.7 and their cosine with the previous round's aggregate
    step is 0.3-0.8; the defaults leave a wide margin around that.
    """

    max_to_global: float = 0.5  # reject a step longer than this fraction of the global model's norm
    min_to_global: float = 1e-4  # reject a step shorter than this: the site (nearly) returned the global model
    peer_ratio: float = 10.0  # "large": a step more than this x the reference norm (rejected only if also opposed)
    history_rounds: int = 5  # accepted norms of this many past rounds join the reference
    clip_factor: float = 1.0  # clip accepted steps to this x the lower median norm (0 = no clipping)
    trust: bool = False  # with 3+ sites, weight each step by its agreement with the others (``agreement_trust``)
    gradient_clip_factor: float = 1.0  # gradient screen: clip to this x this round's lower median norm (0 = no clip)


@dataclasses.dataclass
class ScreenMemory:
    """What the coordinator remembers of accepted rounds: step norms (after clipping) and the last aggregate step."""

    norms: list[list[float]] = dataclasses.field(default_factory=list)  # per past round, accepted step norms
    direction: np.ndarray | None = None  # last aggregate step (flat)

    def remember(self, accepted_norms: Sequence[float], step: np.ndarray | None, keep: int) -> None:
        if accepted_norms:
            self.norms = (self.norms + [list(map(float, accepted_norms))])[-keep:]
        if step is not None and np.linalg.norm(step) > 0:
            self.direction = step

    def past_norms(self) -> list[float]:
        return [v for rnd in self.norms for v in rnd]


@dataclasses.dataclass(frozen=True)
class SiteDecision:
    """The screen's decision on one site's step: rejected (``reason``) or accepted and clipped to ``bound``."""

    norm: float  # the step's norm as sent
    reason: str | None = None  # why it is rejected; None = accepted
    bound: float | None = None  # the norm an accepted step is clipped to (None = not clipped)
    trust: float = 1.0  # factor on the site's aggregation weight, in [0, 1]

    @property
    def accepted(self) -> bool:
        return self.reason is None

    @property
    def scale(self) -> float:
        """Factor on the step (1 = unchanged)."""
        if self.bound is None or self.norm <= self.bound or self.norm == 0:
            return 1.0
        return self.bound / self.norm


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def model_norm(params: Mapping[str, np.ndarray]) -> float:
    """The weights' L2 norm (statistics, the class prototypes, are not weights: see aggregate.flat_delta)."""
    return float(np.sqrt(sum(float((np.asarray(v, np.float64) ** 2).sum()) for k, v in params.items()
                             if not MAGNET.is_statistic(k))))


def _band(norm: float, gnorm: float, rules: ScreenRules) -> str | None:
    """Step 1, the site's own step against the global model only."""
    if norm < rules.min_to_global * gnorm:
        return (f"update barely differs from the global model (step {norm:.3g}, "
                f"{norm / gnorm if gnorm else 0:.2g} of the model's norm {gnorm:.3g})")
    if norm > rules.max_to_global * gnorm:
        return (f"update norm {norm:.3g} is {norm / gnorm:.3g}x the global model's norm {gnorm:.3g} "
                f"(bound {rules.max_to_global})")
    return None


def lower_median(values: Sequence[float]) -> float:
    """The lower of the two middle values (the middle one for an odd count): with at most half of the values
    arbitrarily large, it is at most the largest of the others."""
    return float(np.sort(np.asarray(values, np.float64))[(len(values) - 1) // 2])


def upper_median(values: Sequence[float]) -> float:
    """The upper of the two middle values: with at most half of the values arbitrarily small, it is at least the
    smallest of the others."""
    return float(np.sort(np.asarray(values, np.float64))[len(values) // 2])


def clip_bound(accepted_norms: Sequence[float], past_norms: Sequence[float], clip_factor: float) -> float | None:
    """The round's clipping norm B: ``clip_factor`` x the lower median of this round's accepted step norms and past
    rounds' accepted (clipped) norms; None without clipping or without any norm. Sites sending long steps, up to
    half of them, cannot lift B above the longest of the others' norms."""
    pool = [*accepted_norms, *past_norms]
    if clip_factor <= 0 or not pool:
        return None
    return clip_factor * lower_median(pool)


def reference_norm(in_band_norms: Sequence[float], past_norms: Sequence[float]) -> float | None:
    """What "large" is measured against: the upper median of this round's in-band norms (the step's own included)
    and past rounds' accepted norms (None if empty). Sites sending short steps, up to half of them, cannot pull it
    under the shortest of the others' norms, so they cannot make an honest step look large."""
    pool = [*in_band_norms, *past_norms]
    return upper_median(pool) if pool else None


def screen_updates(global_params: Params, deltas: Mapping[int, np.ndarray], memory: ScreenMemory,
                   rules: ScreenRules = ScreenRules(), dp_clip: float | None = None) -> dict[int, SiteDecision]:
    """The decision on every site's step (node id -> flat step).

    1. Band: the step's norm must lie within [min_to_global, max_to_global] x the global model's norm (the site's
       own step only; works with a single site and in round 1). Non-finite or malformed updates never get here
       (``aggregate.validate_update``).

    With ``dp_clip`` (DP on) that is all: every step in band is accepted and clipped to ``dp_clip``; no decision
    looks at another site. Otherwise:

    2. Opposed and large (both): a step is rejected only if it is longer than ``peer_ratio`` x
       :func:`reference_norm` (this round's in-band norms and past rounds' accepted norms) **and** points
       away from the majority (:func:`opposed`). A long step along the others' direction is clipped, not
       rejected; a step of honest size in any direction is clipped and weighted, not rejected, so honest steps
       that point elsewhere (label skew) always count, and a minority can reject nobody.
    3. Clip: every accepted step is clipped to :func:`clip_bound` (``clip_factor`` x the lower median norm of the
       accepted steps and past rounds' accepted steps): whatever its direction, a site of weight share s moves
       the weighted mean by at most s x that bound from where it would be without its step.
    4. Trust (``rules.trust``, off by default, three or more accepted sites): each accepted site's weight is
       multiplied by :func:`agreement_trust` among the accepted steps. It lowers the weights of steps out of line
       with the others, and so raises the others' effective share: off unless asked for.
    """
    gnorm = model_norm(global_params)
    norms = {node: float(np.linalg.norm(d)) for node, d in deltas.items()}
    reasons: dict[int, str] = {node: r for node, n in norms.items() if (r := _band(n, gnorm, rules))}
    in_band = [node for node in deltas if node not in reasons]
    if dp_clip is not None:
        return {node: SiteDecision(n, reasons.get(node), None if node in reasons else float(dp_clip))
                for node, n in norms.items()}
    past = memory.past_norms()
    ref = reference_norm([norms[o] for o in in_band], past)
    # only a large step can be rejected, so only large steps' directions are judged: the pairwise cosines of all
    # steps (n^2 dot products of the model's length) would make a round's cost grow with the square of the sites
    large = [node for node in in_band if ref is not None and norms[node] > rules.peer_ratio * ref]
    against = opposed(deltas, in_band, memory.direction, candidates=large, norms=norms)
    for node in in_band:
        if node in against and ref is not None and norms[node] > rules.peer_ratio * ref:
            reasons[node] = (f"update is opposed and large: norm {norms[node]:.3g} is {norms[node] / ref:.1f}x the "
                             f"reference {ref:.3g} (upper median of this round's steps and accepted past rounds') "
                             f"and it {against[node]}")
    accepted = [node for node in in_band if node not in reasons]
    bound = clip_bound([norms[o] for o in accepted], past, rules.clip_factor)
    trust = agreement_trust({node: deltas[node] for node in accepted}) if rules.trust else {}
    return {node: SiteDecision(n, reasons.get(node), None if node in reasons else bound, trust.get(node, 1.0))
            for node, n in norms.items()}


def screen_gradients(global_params: Params, deltas: Mapping[int, np.ndarray], rules: ScreenRules = ScreenRules(),
                     dp_clip: float | None = None) -> dict[int, SiteDecision]:
    """The decision on every site's gradient (node id -> flat update = minus the site's full-batch gradient).

    1. Lower band only: a gradient of norm 0 or shorter than ``min_to_global`` x the global model's norm is
       rejected (the site returned (nearly) nothing). No upper band: a gradient is not a move of the model (the
       coordinator's optimiser sets the step), and honest gradients longer than the model's norm occur under label
       skew.
    2. No direction rule: honest gradients of sites with different label mixes point apart, and their mean is the
       consortium's gradient only if every one counts.
    3. Clip (``dp_clip`` under DP, else ``gradient_clip_factor`` x the lower median of this round's accepted
       gradient norms; 0 = no clip): a site of weight share s moves the mean gradient by at most s x that bound, in
       any direction. Up to half of the sites sending long gradients cannot lift the lower median above the
       others' norms; fewer than half sending short ones cannot pull it below them (half of an even number can:
       they then shorten every honest gradient, slowing the run, not steering it). Only this round's norms count:
       gradients shrink as training proceeds.
    """
    gnorm = model_norm(global_params)
    norms = {node: float(np.linalg.norm(d)) for node, d in deltas.items()}
    reasons = {node: f"gradient barely differs from zero (norm {n:.3g}, {n / gnorm if gnorm else 0:.2g} of the "
                     f"model's norm {gnorm:.3g})"
               for node, n in norms.items() if n == 0 or n < rules.min_to_global * gnorm}
    accepted = [node for node in norms if node not in reasons]
    if dp_clip is not None:
        bound: float | None = float(dp_clip)
    else:
        bound = clip_bound([norms[o] for o in accepted], [], rules.gradient_clip_factor)
    return {node: SiteDecision(n, reasons.get(node), None if node in reasons else bound)
            for node, n in norms.items()}


def agreement(deltas: Mapping[int, np.ndarray]) -> dict[int, float]:
    """Per step, the mean over the other steps of max(0, cosine of the two)."""
    nodes = list(deltas)
    return {i: float(np.mean([max(0.0, _cos(deltas[i], deltas[j])) for j in nodes if j != i])) for i in nodes}


def agreement_trust(deltas: Mapping[int, np.ndarray]) -> dict[int, float]:
    """Weight factors from :func:`agreement`, with three or more steps (else all 1): min(1, a_i / median_j a_j).
    Sites at or above the median agreement keep their full weight (an honest majority is weighted as without the
    rule); a step the others share less loses weight in proportion. Symmetric camps (two against two) get equal
    trust, so no minority can take weight away from a majority."""
    nodes = list(deltas)
    if len(nodes) < 3:
        return dict.fromkeys(nodes, 1.0)
    agree = agreement(deltas)
    mid = float(np.median(list(agree.values())))
    if mid <= 0:
        return dict.fromkeys(nodes, 1.0)
    return {i: min(1.0, a / mid) for i, a in agree.items()}


def opposed(deltas: Mapping[int, np.ndarray], nodes: Sequence[int], last: np.ndarray | None,
            candidates: Sequence[int] | None = None, norms: Mapping[int, float] | None = None) -> dict[int, str]:
    """The steps among ``nodes`` that point away from the majority: node -> how. With three or more steps, one
    whose cosine is non-positive with strictly more than half of the ``len(nodes)`` steps (a minority of
    colluders alone can never make a step opposed). With one or two steps no majority exists and the last
    aggregate step joins the references: opposed if no reference (the other step, the last aggregate step) has a
    positive cosine with it; with no last step and at most one other step, nothing is judged opposed.
    ``candidates``: judge only these of ``nodes`` (default all; the majority is still over all ``nodes``): the cost
    is len(candidates) x len(nodes) dot products. ``norms``: the steps' norms if known (node -> norm)."""
    out: dict[int, str] = {}
    n = len(nodes)
    norms = norms if norms is not None else {}

    def cos(a: int, b: int) -> float:
        na = norms[a] if a in norms else float(np.linalg.norm(deltas[a]))
        nb = norms[b] if b in norms else float(np.linalg.norm(deltas[b]))
        return float(deltas[a] @ deltas[b] / (na * nb)) if na > 0 and nb > 0 else 0.0

    for node in (nodes if candidates is None else [c for c in nodes if c in set(candidates)]):
        others = [o for o in nodes if o != node]
        if n >= 3:
            count = sum(cos(node, o) <= 0 for o in others)
            if 2 * count > n:
                out[node] = f"points away from the majority (non-positive cosine with {count} of the {n} steps)"
            continue
        if last is None:
            continue  # one other site at most and no past step: no trusted reference
        refs = [deltas[o] for o in others] + [last]
        if not any(_cos(deltas[node], r) > 0 for r in refs):
            out[node] = (f"points away from all its references (non-positive cosine with "
                         f"{'the other step and ' if others else ''}the last aggregate step)")
    return out


def shrink(global_params: Params, params: Mapping[str, np.ndarray], scale: float) -> Params:
    """``params`` with its step from ``global_params`` multiplied by ``scale`` (the clip the screen decided); the
    statistics (class prototypes) as sent: they are no step (checked by aggregate.prototype_problems instead)."""
    if scale >= 1.0:
        return dict(params)

    def step(k: str, g: np.ndarray) -> np.ndarray:
        out = np.asarray(g, np.float64) + scale * (np.asarray(params[k], np.float64) - g)
        return out.astype(np.asarray(g).dtype)

    return {k: np.array(params[k], copy=True) if MAGNET.is_statistic(k) else step(k, g)
            for k, g in global_params.items()}
