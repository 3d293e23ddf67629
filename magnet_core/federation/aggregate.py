"""Pure aggregation math: modality-aware FedAvg, robust variants, server optimizers, update validation, pooled
metrics. (The per-site screen of updates and its clipping bound are in ``screening``.)"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from magnet_core.model.metrics import EvalCounts, empty_ranking, metrics_from_confusion, ranking_from_histogram
from magnet_core.model.network import MAGNET

Params = dict[str, np.ndarray]
Robust = Literal["auto", "mean", "trimmed-mean", "median", "near-median"]
# "auto" (opt-in; the default stays "mean" until its honest cost is measured): the coordinate-wise median with at
# least this many accepted sites, the weighted mean below
# (with 1-2 sites no median bounds a dishonest site by honest values; the screen's clip bounds each site)
AUTO_ROBUST_SITES = 3


@dataclasses.dataclass
class SiteUpdate:
    """What one site sends back after local training (no patient-level data)."""

    site: str
    params: Params
    num_train: int
    modality_counts: dict[str, int]
    trust: float = 1.0  # factor on the site's weight (the screen's agreement trust), in [0, 1]


def trimmed_per_side(trim: float, num_sites: int) -> int:
    """b, the sites a coordinate-wise trimmed mean drops on each side: floor(trim x sites)."""
    return int(np.floor(trim * num_sites))


def applied_rule(robust: Robust, num_sites: int) -> str:
    """The rule ``robust`` applies to ``num_sites`` contributing updates: "auto" is the coordinate-wise median
    (Yin et al. 2018) from :data:`AUTO_ROBUST_SITES` sites on and the weighted mean below; the others are
    themselves. Chosen over near-median on tuning runs (benchmarks/results/inband_attacker_tuning.json): near-median
    left the most distinct honest site out under label skew and cost 0.21 held-out MCC on BRCA label-skew-3."""
    if robust == "auto":
        return "median" if num_sites >= AUTO_ROBUST_SITES else "mean"
    return robust


def robust_refusal(robust: Robust, trim: float, num_sites: int) -> str | None:
    """Why ``robust`` cannot aggregate ``num_sites`` updates (None: it can). A trimmed mean must drop b >= 1 site on
    each side and keep one (num_sites >= 2b + 1); with fewer sites it would silently be a plain mean."""
    if robust != "trimmed-mean":
        return None if num_sites >= 1 else "no update to aggregate"
    b = trimmed_per_side(trim, num_sites)
    if b < 1:
        need = int(np.ceil(1 / trim)) if trim > 0 else None
        return (f"a trimmed mean with trim={trim:g} over {num_sites} site(s) drops floor({trim:g} x {num_sites}) = 0 "
                f"per side: it needs b >= 1 site trimmed on each side and 2b + 1 sites in all "
                f"({f'at least {max(3, need)} sites at this trim' if need else 'trim > 0'}); "
                f"use robust='median' or a larger trim")
    return None


def _combine(stack: np.ndarray, weights: np.ndarray, robust: Robust, trim: float) -> np.ndarray:
    """Coordinate-wise: the median, the trimmed mean (b = floor(trim x sites) dropped on each side; ValueError when
    b = 0, see :func:`robust_refusal`) or the weighted mean; "auto" is the median of a block held by 3 or more
    sites and the weighted mean below (:func:`applied_rule`). The median and the trimmed mean are unweighted."""
    robust = applied_rule(robust, stack.shape[0])
    if robust == "median":
        return np.median(stack, axis=0)
    if robust == "trimmed-mean":
        refusal = robust_refusal(robust, trim, stack.shape[0])
        if refusal:
            raise ValueError(refusal)
        k = trimmed_per_side(trim, stack.shape[0])
        return np.sort(stack, axis=0)[k : stack.shape[0] - k].mean(axis=0)
    w = weights / weights.sum()
    return np.tensordot(w, stack, axes=1)


def aggregate_updates(
    global_params: Params,
    updates: Sequence[SiteUpdate],
    modality_aware: bool = True,
    robust: Robust = "mean",
    trim: float = 0.2,
) -> Params:
    """New global parameters.

    Modality-aware: the encoder of modality m is averaged over the sites that trained it, weighted by their
    number of training patients holding m; if no site holds m it stays as it was. Shared layers (attention, GNN,
    head) are averaged over all sites weighted by training patients. ``modality_aware=False`` is plain FedAvg
    (every parameter weighted by training patients). Each weight is multiplied by the update's ``trust`` (the
    screen's agreement factor). ``robust`` replaces the weighted mean with a coordinate-wise trimmed mean or median
    over the contributing sites ("auto": the median of a block held by 3 or more sites, else the weighted mean);
    "near-median" takes the weighted mean of the updates :func:`near_median` keeps.
    """
    if not updates:
        return {k: v.copy() for k, v in global_params.items()}
    if robust == "near-median":
        updates, robust = near_median(global_params, updates), "mean"
    out: Params = {}
    for name, current in global_params.items():
        # statistics (class prototypes) always take the weighted mean: a coordinate-wise median of sums and masses
        # is no prototype, and a class held by a minority of sites would never get one
        rule: Robust = "mean" if MAGNET.is_statistic(name) else robust
        modality = MAGNET.encoder_modality(name)
        if modality_aware and modality is not None:
            contrib = [(u, u.modality_counts.get(modality, 0) * u.trust) for u in updates]
            contrib = [(u, c) for u, c in contrib if c > 0]
        else:
            contrib = [(u, u.num_train * u.trust) for u in updates]
        if not contrib or sum(c for _, c in contrib) <= 0:
            out[name] = current.copy()
            continue
        stack = np.stack([u.params[name].astype(np.float64) for u, _ in contrib])
        weights = np.array([c for _, c in contrib], dtype=np.float64)
        out[name] = _combine(stack, weights, rule, trim).astype(current.dtype)
    return out


def dropped_per_round(num_sites: int) -> int:
    """f, the updates ``near-median`` leaves out: floor((sites - 1) / 2), so the n - f kept are a strict majority."""
    return max(0, (num_sites - 1) // 2)


def near_median(global_params: Params, updates: Sequence[SiteUpdate]) -> list[SiteUpdate]:
    """The n - f updates whose steps lie nearest (L2 over the whole model) to the coordinate-wise median step,
    f = :func:`dropped_per_round` (ties: the earlier update); their weighted mean is the ``near-median`` rule.

    The centre is the coordinate-wise median (Yin et al. 2018, "Byzantine-robust distributed learning"), which
    with fewer than half of the sites dishonest lies per coordinate within the honest values; keeping the updates
    nearest to it and averaging them is the vector form of Xie, Koyejo and Gupta's mean-around-median (2018,
    "Generalized Byzantine-tolerant SGD") and the selection idea of Multi-Krum (Blanchard et al. 2017). An
    update far from the honest ones (a replacer) is left out and the honest ones keep their weighted mean; an
    update near enough to be kept is within the honest spread of the median."""
    n = len(updates)
    f = dropped_per_round(n)
    if f == 0:
        return list(updates)
    steps = np.stack([flat_delta(global_params, u.params) for u in updates])
    centre = np.median(steps, axis=0)
    dist = np.linalg.norm(steps - centre, axis=1)
    keep = sorted(np.argsort(dist, kind="stable")[: n - f])
    return [updates[i] for i in keep]


# ------------------------------------------------------------------------------- server-side adaptive optimizer

ServerRule = Literal["adam", "yogi", "torch-adam"]
# torch.optim.Adam's defaults, what centralized training uses (magnet_core.model.train.make_optimizer)
TORCH_ADAM_BETAS, TORCH_ADAM_EPS = (0.9, 0.999), 1e-8


def step_lr(lr: float, lr_step: int, lr_gamma: float, server_round: int) -> float:
    """The learning rate torch's StepLR gives epoch ``server_round - 1`` (one epoch per round): what the
    coordinator's "preset-adam" steps with in round ``server_round``, so that fedsgd follows centralized training's
    schedule."""
    return lr * lr_gamma ** ((server_round - 1) // lr_step)


@dataclasses.dataclass
class ServerOptState:
    """A server optimizer's memory per array: first and second moments (float64) and the steps each array took
    (arrays skipped in a round keep their moments and count)."""

    m: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    v: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    steps: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_tensors(self) -> dict:
        """Tensors, ints and dicts only (a checkpoint loadable with ``weights_only=True``)."""
        import torch

        return {"m": {k: torch.from_numpy(v.copy()) for k, v in self.m.items()},
                "v": {k: torch.from_numpy(v.copy()) for k, v in self.v.items()},
                "steps": {k: int(v) for k, v in self.steps.items()}}

    @classmethod
    def from_tensors(cls, state: Mapping, template: Params) -> "ServerOptState":
        """Inverse of :meth:`to_tensors`, checked against the model's arrays ``template`` (names, shapes, finite
        values); raises ValueError."""
        m = {str(k): np.asarray(v.numpy(), np.float64) for k, v in dict(state.get("m") or {}).items()}
        v = {str(k): np.asarray(x.numpy(), np.float64) for k, x in dict(state.get("v") or {}).items()}
        steps = {str(k): int(x) for k, x in dict(state.get("steps") or {}).items()}
        for name, arrays in (("m", m), ("v", v)):
            for k, a in arrays.items():
                if k not in template or a.shape != template[k].shape or not np.all(np.isfinite(a)):
                    raise ValueError(f"server optimizer state: {name}[{k!r}] does not fit the model")
        if set(m) != set(v) or set(m) != set(steps) or any(n < 1 for n in steps.values()) \
                or any((x < 0).any() for x in v.values()):
            raise ValueError("server optimizer state: inconsistent moments and step counts")
        return cls(m, v, steps)


def server_opt_step(global_params: Params, aggregated: Params, state: ServerOptState, rule: ServerRule,
                    eta: float, beta1: float, beta2: float, tau: float,
                    active: set[str] | None = None) -> tuple[Params, ServerOptState]:
    """One server step of FedAdam / FedYogi (Reddi et al. 2021, as Flower's strategies compute it) along the
    pseudo-gradient d = aggregated - global, array by array:

        m = beta1 m + (1 - beta1) d
        adam: v = beta2 v + (1 - beta2) d^2;                  w = w + eta_t m / (sqrt(v) + tau),
              eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t), t = the array's step count (1 at its first step;
              Flower's FedAdam uses t = server_round + 1)
        yogi: v = v - (1 - beta2) d^2 sign(v - d^2);          w = w + eta m / (sqrt(v) + tau)
        torch-adam: as adam, with torch.optim.Adam's placement of the constant:
              w = w + (eta / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + tau)
              (with d minus a gradient, beta1 0.9, beta2 0.999, tau 1e-8: torch's Adam step on that gradient)

    Arrays not in ``active`` (no site trained them this round, e.g. the encoder of a modality no contributing
    site holds) are left exactly as they are, moments and step count included: their zero pseudo-gradient must
    not let old momentum move them. Non-float arrays and statistics (the class prototypes,
    :meth:`MAGNET.is_statistic`) take the aggregate. Pure: inputs are not modified."""
    if rule not in ("adam", "yogi", "torch-adam"):
        raise ValueError(f"unknown server optimizer {rule!r}; choose adam, yogi or torch-adam")
    new: Params = {}
    out = ServerOptState(dict(state.m), dict(state.v), dict(state.steps))
    for name, current in global_params.items():
        if active is not None and name not in active:
            new[name] = current.copy()
            continue
        if not np.issubdtype(current.dtype, np.floating) or MAGNET.is_statistic(name):
            new[name] = np.array(aggregated[name], copy=True)
            continue
        g = current.astype(np.float64)
        d = aggregated[name].astype(np.float64) - g
        m = beta1 * state.m.get(name, np.zeros_like(g)) + (1 - beta1) * d
        v_prev = state.v.get(name, np.zeros_like(g))
        t = state.steps.get(name, 0) + 1
        if rule == "torch-adam":
            v = beta2 * v_prev + (1 - beta2) * d**2
            step = (eta / (1 - beta1**t)) * m / (np.sqrt(v) / np.sqrt(1 - beta2**t) + tau)
        elif rule == "adam":
            v = beta2 * v_prev + (1 - beta2) * d**2
            step = eta * np.sqrt(1 - beta2**t) / (1 - beta1**t) * m / (np.sqrt(v) + tau)
        else:
            v = v_prev - (1 - beta2) * d**2 * np.sign(v_prev - d**2)
            step = eta * m / (np.sqrt(v) + tau)
        new[name] = (g + step).astype(current.dtype)
        out.m[name], out.v[name], out.steps[name] = m, v, t
    return new, out


def trained_arrays(global_params: Params, updates: Sequence[SiteUpdate]) -> set[str]:
    """Arrays some update trained: an encoder of modality m if a site holding m contributed, every other array if
    any site contributed (the blocks a server optimizer may step)."""
    if not updates:
        return set()
    held = {m for u in updates for m, c in u.modality_counts.items() if c > 0}
    return {name for name in global_params
            if (m := MAGNET.encoder_modality(name)) is None or m in held}


def validate_update(global_params: Params, params: Mapping[str, np.ndarray]) -> list[str]:
    """Problems that make an update unusable: wrong array names, dtypes or shapes, non-finite values."""
    problems = []
    missing = sorted(set(global_params) - set(params))
    extra = sorted(set(params) - set(global_params))
    if missing:
        problems.append(f"missing arrays: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected arrays: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name in sorted(set(global_params) & set(params)):
        a, g = params[name], global_params[name]
        if a.dtype != g.dtype:
            problems.append(f"array {name!r} has dtype {a.dtype}, expected {g.dtype}")
        elif tuple(a.shape) != tuple(g.shape):
            problems.append(f"array {name!r} has shape {tuple(a.shape)}, expected {tuple(g.shape)}")
        elif not np.all(np.isfinite(a)):
            problems.append(f"array {name!r} has {int((~np.isfinite(a)).sum())} non-finite values")
    if not problems and "prototype_mass" in global_params:
        problems += prototype_problems(global_params, params)
    return problems


PROTOTYPE_PEER_RATIO = 10.0  # a released class mean longer than this x the round's median released norm is refused


def prototype_problems(global_params: Params, params: Mapping[str, np.ndarray]) -> list[str]:
    """What an honest site cannot have sent in the class-prototype buffers (magnet_core.model.prototypes): for each
    class it either returns the received (sum, mass) exactly, or releases its class mean with mass exactly 1
    (prototype runs aggregate in the clear, without DP or secure sums: server/config.py refuses those, so no clip
    touches a reply). So every mass is the received one or 1, and a class below mass 1 that the site did not release
    has its sum unchanged: a site cannot give itself weight in a class it did not release, nor move a prototype
    without owning its mass. (What a released mean holds is bounded by :func:`prototype_outliers`.)"""
    g_mass, mass = np.asarray(global_params["prototype_mass"]), np.asarray(params["prototype_mass"])
    g_sum, s = np.asarray(global_params["prototype_sum"]), np.asarray(params["prototype_sum"])
    problems = []
    bad_mass = (mass != g_mass) & (mass != 1)
    if bad_mass.any():
        problems.append(f"class prototypes: masses {mass[bad_mass].tolist()} of class(es) "
                        f"{np.flatnonzero(bad_mass).tolist()} are neither the received ones nor 1 (a released class)")
    moved = (mass == g_mass) & (g_mass != 1) & np.any(s != g_sum, axis=1)
    if moved.any():
        problems.append(f"class prototypes: the sum of class(es) {np.flatnonzero(moved).tolist()} changed while "
                        "their mass did not (an honest site returns a class it does not release exactly as received)")
    return problems


def released_means(global_params: Params, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """The classes an update released (mass 1 and a changed sum, or a mass that became 1), as a (C,) bool mask."""
    g_mass, mass = np.asarray(global_params["prototype_mass"]), np.asarray(params["prototype_mass"])
    changed = np.any(np.asarray(params["prototype_sum"]) != np.asarray(global_params["prototype_sum"]), axis=1)
    return (mass == 1) & (changed | (g_mass != 1))


def prototype_outliers(global_params: Params, updates: Mapping[Any, Mapping[str, np.ndarray]],
                       ratio: float = PROTOTYPE_PEER_RATIO) -> dict[Any, str]:
    """Updates whose released class means are out of scale: any released mean longer than ``ratio`` x the reference,
    the lower median of one vote per releasing site (the median norm of its released means) and one for the current
    prototypes (their median norm, once any exists). One vote per site, not per mean: a site releasing every class
    cannot outvote sites that hold k patients of fewer classes; up to half of the votes long cannot lift the
    reference. A site releasing alone in the first round has no reference to be held to (its means are then the
    only ones of their classes). {update key: reason}; empty without prototypes."""
    if "prototype_mass" not in global_params:
        return {}
    from magnet_core.federation.screening import lower_median
    from magnet_core.model.prototypes import MIN_MASS

    g_mass = np.asarray(global_params["prototype_mass"], np.float64)
    g_sum = np.asarray(global_params["prototype_sum"], np.float64)
    defined = g_mass >= MIN_MASS
    norms = {key: np.linalg.norm(np.asarray(p["prototype_sum"], np.float64)[released_means(global_params, p)], axis=1)
             for key, p in updates.items()}
    votes = [float(np.median(n)) for n in norms.values() if n.size]
    if defined.any():
        votes.append(float(np.median(np.linalg.norm(g_sum[defined] / g_mass[defined, None], axis=1))))
    if not votes:
        return {}
    ref = lower_median(votes)
    return {key: f"class prototypes: a released class mean of norm {float(n.max()):.3g} is more than {ratio:g}x the "
                 f"round's reference norm {ref:.3g}"
            for key, n in norms.items() if n.size and float(n.max()) > ratio * max(ref, 1e-12)}


def flat_delta(global_params: Params, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """(update - global) over the weights, as one float64 vector in sorted-name order: the step every norm, screen
    and direction reads. Statistics (the class prototypes, :meth:`MAGNET.is_statistic`) are not a step: they have
    their own check (:func:`prototype_problems`, :func:`prototype_outliers`)."""
    return np.concatenate([(np.asarray(params[k], np.float64) - global_params[k]).ravel()
                           for k in sorted(global_params) if not MAGNET.is_statistic(k)])


class StepsOnDemand(collections.abc.Mapping):
    """node -> flat step (update - global, :func:`flat_delta`), computed each time it is read and not kept: the
    screen reads every step once for its norm (and only large steps again), so a round holds one float64 step at a
    time instead of one per site (9.4 MB each for the OV preset)."""

    def __init__(self, global_params: Params, updates: Mapping[int, Mapping[str, np.ndarray]]):
        self.global_params, self.updates = global_params, updates

    def __getitem__(self, node: int) -> np.ndarray:
        return flat_delta(self.global_params, self.updates[node])

    def __iter__(self):
        return iter(self.updates)

    def __len__(self) -> int:
        return len(self.updates)


def update_norm(global_params: Params, params: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update - global) over all arrays."""
    return float(np.linalg.norm(flat_delta(global_params, params)))


# --------------------------------------------------------------------------------------- pooled evaluation


def metrics_from_counts(confusion: dict[str, np.ndarray], histogram: dict[str, np.ndarray]) -> dict[str, float | None]:
    """acc/f1/mcc (+ auroc/auprc if histograms) for all patients and ``paired_``/``unpaired_`` groups."""
    out: dict[str, float | None] = {}
    for group, cm in confusion.items():
        prefix = "" if group == "all" else f"{group}_"
        if cm.sum() == 0:
            vals: dict[str, float | None] = {"acc": None, "f1": None, "mcc": None}
        else:
            vals = dict(metrics_from_confusion(cm))
        hist = histogram.get(group)
        vals.update(ranking_from_histogram(hist) if hist is not None else empty_ranking())
        out.update({f"{prefix}{k}": v for k, v in vals.items()})
    return out


def pool_counts(sites: Sequence[EvalCounts]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sum confusion matrices and histograms over the sites that released each group (exactly the pooled
    predictions' counts where every site released the group)."""
    groups = [g for g in ("all", "paired", "unpaired") if any(g in s.confusion for s in sites)]
    groups += sorted({g for s in sites for g in s.confusion} - set(groups))
    confusion = {g: sum(s.confusion[g] for s in sites if g in s.confusion) for g in groups}
    histogram = {g: sum(s.histogram[g] for s in sites if g in s.histogram)
                 for g in groups if any(g in s.histogram for s in sites)}
    return confusion, histogram


def pooled_metrics(sites: Sequence[EvalCounts]) -> dict[str, float | None]:
    """Global metrics as if all sites' test patients were pooled (never an average of per-site MCCs)."""
    if not sites:
        return {}
    return metrics_from_counts(*pool_counts(sites))
